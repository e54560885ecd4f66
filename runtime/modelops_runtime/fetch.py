"""`modelops-fetch`: the pod's init step. Downloads the model into a volume and checks its sha256.

Exit codes say what went wrong, so the operator can name it in status without reading logs:
3 the digest does not match, 4 the download failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile

from .errors import ModelLoadError
from .model import fetch, verify

EXIT_INTEGRITY = 3
EXIT_DOWNLOAD = 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modelops-fetch", description=__doc__)
    p.add_argument("--uri", required=True, help="http(s)://, s3:// or a local path")
    p.add_argument("--sha256", required=True, help="expected sha256 of the file")
    p.add_argument("--dest", required=True, help="where to write the verified file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = tempfile.mkdtemp(prefix=".fetch-", dir=os.path.dirname(os.path.abspath(args.dest)) or ".")
    try:
        try:
            path = fetch(args.uri, workdir)
        except ModelLoadError as e:
            print(f"modelops-fetch: {e}", file=sys.stderr)
            return EXIT_DOWNLOAD
        try:
            digest = verify(path, args.sha256)
        except ModelLoadError as e:
            print(f"modelops-fetch: {e}", file=sys.stderr)
            return EXIT_INTEGRITY
        shutil.copyfile(path, args.dest + ".tmp")
        os.replace(args.dest + ".tmp", args.dest)
        print(f"modelops-fetch: verified {args.uri} (sha256 {digest}) into {args.dest}")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
