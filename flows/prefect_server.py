"""Prefect's API server process for one run, as flows.ephemeral.TemporaryServer starts it.

The same as `python -m uvicorn ... prefect.server.api.server:create_app`, except for the
garbage collector while Prefect's server imports. The import takes seconds and makes
objects that live as long as the server does; collecting cycles again and again over
them was about a quarter of it (`python -c "import prefect.server.api.server"`: 7.4 to
8.0 s, 5.9 to 6.2 s with collection off). Every run waits for this start. So collection
is off while it imports, what the import made is frozen out of later collections, and
collection is on again, as usual, while the server serves.
"""

from __future__ import annotations

import gc


def main() -> None:
    gc.disable()
    try:
        import prefect.server.api.server  # noqa: F401, PLC0415 - the point: imported with collection off
        from uvicorn.main import main as uvicorn_main  # noqa: PLC0415
    finally:
        gc.freeze()
        gc.enable()
    uvicorn_main(prog_name="uvicorn")  # reads the uvicorn options from the command line, exits


if __name__ == "__main__":
    main()
