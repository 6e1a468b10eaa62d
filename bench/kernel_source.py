"""The source of inductor's generated kernels whose name contains a pattern, with their tuned configs
and the lines that launch them (diagnostic: to compare one kernel across processes).

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind python bench/decode_probe.py ... --compile_step
    python bench/kernel_source.py /tmp/ind rsqrt_sin
"""

from __future__ import annotations

import re
from pathlib import Path

import click


@click.command()
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("pattern")
@click.option("--launches", "launches_shown", default=3, show_default=True, help="launch lines shown per kernel")
def main(cache_dir: Path, pattern: str, launches_shown: int) -> None:
    definition = re.compile(r"^def (triton_\w*" + re.escape(pattern) + r"\w*)\(", re.M)
    sources = sorted(cache_dir.rglob("*.py"))
    kernels = {}
    texts = {path: path.read_text(errors="replace") for path in sources}
    for path, text in texts.items():
        if "async_compile.triton(" in text:  # a graph's wrapper module: its kernels' sources are strings in it
            continue
        for name in definition.findall(text):
            kernels.setdefault(name, []).append((path, text))
    launch_lines = [line.strip() for text in texts.values() for line in text.splitlines() if ".run(" in line]
    if not kernels:
        raise click.ClickException(f"no generated kernel named like '{pattern}' under {cache_dir}")
    for name, files in sorted(kernels.items()):
        distinct = {}
        for path, text in files:
            distinct.setdefault(text[max(text.find("@triton_heuristics"), 0):], []).append(path)
        for body, paths in distinct.items():
            print(f"=== {name}: {len(paths)} file(s) with this source, first {paths[0]}")
            print(body)
            for path in paths:  # inductor names a kernel's tuned config by a hash of its own, beside the kernel
                for config in sorted(path.parent.glob("*.best_config")):
                    print(f"--- tuned config in {path.parent.name}/: {config.read_text().strip()}")
        launches = [line for line in launch_lines if f"{name}.run(" in line]
        for line in launches[:launches_shown]:
            print(f"--- launch: {line}")


if __name__ == "__main__":
    main()
