"""Fetch NiiVue's browser bundle from the npm registry into the package (the build step of
the HTML report's static asset).

    python tools/fetch_niivue.py [--version X.Y.Z]

Runs ``npm pack @niivue/niivue@VERSION`` (npm's own registry settings apply), checks the
tarball against the registry's SHA-512 integrity, and writes ``dist/niivue.umd.js`` with
NiiVue's BSD-2-Clause licence and a ``niivue.json`` record (version, integrity, SHA-256 of
the bundle) into ``src/unireg/viewer/static/``. The wheel ships those files, so users need
no Node.js; this step only runs when the bundled NiiVue is updated.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

STATIC = Path(__file__).resolve().parents[1] / "src" / "unireg" / "viewer" / "static"
PACKAGE = "@niivue/niivue"
BUNDLE = "package/dist/niivue.umd.js"
LICENSE = """BSD 2-Clause License

Copyright (c) 2021, Niivue
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def npm(*args: str, cwd: Path) -> str:
    return subprocess.run(["npm", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    record = (
        json.loads((STATIC / "niivue.json").read_text())
        if (STATIC / "niivue.json").exists()
        else {}
    )
    parser.add_argument(
        "--version", default=record.get("version"), required="version" not in record
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        packed = json.loads(npm("pack", f"{PACKAGE}@{args.version}", "--json", cwd=work))[0]
        tarball = work / packed["filename"]
        algorithm, expected = packed["integrity"].split("-", 1)
        digest = base64.b64encode(hashlib.new(algorithm, tarball.read_bytes()).digest()).decode()
        if digest != expected:
            raise SystemExit(
                f"{tarball.name}: {algorithm} {digest} is not the registry's {expected}"
            )
        with tarfile.open(tarball) as tar:
            member = tar.extractfile(BUNDLE)
            if member is None:
                raise SystemExit(f"{tarball.name} has no {BUNDLE}")
            bundle = member.read()
    if b"</script" in bundle.lower():
        raise SystemExit("the bundle holds '</script' and cannot be inlined in a page")
    (STATIC / "niivue.umd.js").write_bytes(bundle)
    (STATIC / "NIIVUE-LICENSE.txt").write_text(LICENSE)
    record = {
        "package": PACKAGE,
        "version": packed["version"],
        "integrity": packed["integrity"],
        "file": BUNDLE,
        "sha256": hashlib.sha256(bundle).hexdigest(),
        "license": "BSD-2-Clause",
    }
    (STATIC / "niivue.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{PACKAGE}@{packed['version']}: {len(bundle) / 1e6:.2f} MB -> {STATIC}")


if __name__ == "__main__":
    main()
