"""``python -m dqdeploy`` (and ``torchrun ... -m dqdeploy``): the command line."""

from .cli import main

main()
