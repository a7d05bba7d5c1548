"""``python -m bf.cli``: what torchrun and the benchmarks start."""

from bf.cli.app import main

main()
