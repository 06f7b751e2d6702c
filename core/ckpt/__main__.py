"""``python -m ckpt``: the ``ckpt`` command line."""

from ckpt.cli import main

main()
