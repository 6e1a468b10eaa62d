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
@click.option("--launches", default=3, show_default=True, help="launch lines shown per kernel")
def main(cache_dir: Path, pattern: str, launches: int) -> None:
    definition = re.compile(r"^def (triton_\w*" + re.escape(pattern) + r"\w*)\(", re.M)
    sources = sorted(cache_dir.rglob("*.py"))
    kernels = {}
    for path in sources:
        text = path.read_text(errors="replace")
        for name in definition.findall(text):
            kernels.setdefault(name, []).append((path, text))
    if not kernels:
        raise click.ClickException(f"no generated kernel named like '{pattern}' under {cache_dir}")
    for name, files in sorted(kernels.items()):
        distinct = {}
        for path, text in files:
            distinct.setdefault(text[text.find("@triton_heuristics"):], []).append(path)
        for body, paths in distinct.items():
            print(f"=== {name}: {len(paths)} file(s) with this source, first {paths[0]}")
            print(body)
            for path in paths:
                config = path.with_suffix(".best_config")
                if config.exists():
                    print(f"--- tuned config {config.name}: {config.read_text()}")
        shown = 0
        for source in sources:
            for line in source.read_text(errors="replace").splitlines():
                if f"{name}.run(" in line and shown < launches:
                    print(f"--- launch in {source.name}: {line.strip()}")
                    shown += 1

if __name__ == "__main__":
    main()
