"""Entry point of the packaged site app (the script PyInstaller freezes as ``tessera-site``).

It is ``site_client.cli.main`` with one addition. In the bundle there is no Python
interpreter: ``sys.executable`` is this program. The site's trainer starts its training
process as ``sys.executable -m site_client.core.train_worker --serve`` (see
``site_client.core.trainer``), which from source runs the module with Python; here the frozen
program receives those arguments and must run the worker itself. Only that one module is
accepted after ``-m``: the bundle is not a general Python interpreter.
"""

from __future__ import annotations

import multiprocessing
import sys

WORKER = "site_client.core.train_worker"


def main() -> int:
    multiprocessing.freeze_support()  # a no-op on Linux and macOS; needed on Windows
    if sys.argv[1:3] == ["-m", WORKER]:
        from site_client.core.train_worker import main as worker_main

        sys.argv = [sys.argv[0], *sys.argv[3:]]
        return int(worker_main(sys.argv[1:]) or 0)
    if sys.argv[1:2] == ["-m"]:
        print(f"tessera-site: only '-m {WORKER}' is available in this bundle", file=sys.stderr)
        return 2
    from site_client.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
