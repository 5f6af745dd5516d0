"""``python -m dqdeploy.cli``: the command line without ``python -m dqdeploy``'s torchrun handling."""

from . import main

if __name__ == "__main__":
    main()
