"""``python -m dqdeploy`` (and ``torchrun ... -m dqdeploy``): the command line.

A process started by torchrun ends with ``os._exit`` once its command has finished and its output is
flushed: the interpreter's own teardown there sometimes aborts in native code ("terminate called
without an active exception") after the work is done and written, which torchrun reports as a
failed job (docs/notes/bench-notes.md, "Many processes").
"""

import logging
import os
import sys

from .cli import main
from .system.launch import launched, write_exit_status

if not launched():
    main()
else:
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    write_exit_status(code)  # the launcher of --nproc exits with it (torchrun's own status is 1 for any failure)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
