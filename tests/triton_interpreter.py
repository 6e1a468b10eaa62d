"""Kernel tests on CPU through triton's interpreter, in a child pytest.

TRITON_INTERPRET is read whenever `triton.jit` decorates a function, and triton's own library
functions (tl.zeros, tl.max, tl.sum, ...) are decorated when `triton.language` is first imported;
inside one pytest session that has already happened by the time a kernel test module is collected
(importing latentmas.fast_decode imports triton). Kernels of ours then run in the interpreter but
calling those library functions from them fails (checked with triton 3.9). So on CPU a module's
kernel tests run in a child pytest of that module with TRITON_INTERPRET=1 set from the start; in
this process they skip. On CUDA they run here.

A kernel test module (whose kernel module has `triton`, `tl` and `_kernels()` returning
`(first kernel, ..., interpreted)`) declares::

    kernels = kernels_fixture(module)
    test_kernels_in_the_triton_interpreter = interpreter_child_test(__file__, module)

and its kernel tests take the `kernels` fixture and have "kernel" in their names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def kernels_fixture(module):
    """A module-scoped fixture giving `module._kernels()` where they can run in this process (CUDA,
    or the interpreter from the start), else skipping."""

    @pytest.fixture(scope="module")
    def kernels():
        if module.triton is None:
            pytest.skip("triton does not import")
        if DEVICE == "cpu" and not INTERPRETED:
            pytest.skip("on CPU the kernels run in test_kernels_in_the_triton_interpreter's child process")
        built = module._kernels()
        if INTERPRETED:
            from triton.runtime.interpreter import InterpretedFunction

            assert isinstance(built[0], InterpretedFunction) and built[-1], "kernels not built for the interpreter"
            assert isinstance(module.tl.zeros, InterpretedFunction), "triton was imported before TRITON_INTERPRET=1"
        return built

    return kernels


def interpreter_child_test(test_file: str, module):
    """A test that runs every kernel test of `test_file` in a child pytest under the interpreter (on
    CPU, in the parent session only)."""
    test_path = Path(test_file).resolve()

    @pytest.mark.skipif(DEVICE == "cuda" or INTERPRETED or module.triton is None,
                        reason="the kernel tests run in this process (CUDA or interpreter), or triton is missing")
    def test_kernels_in_the_triton_interpreter():
        repo = test_path.parents[1]
        env = {**os.environ, "TRITON_INTERPRET": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                               "kernel and not in_the_triton_interpreter", str(test_path)],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-2000:]

    return test_kernels_in_the_triton_interpreter
