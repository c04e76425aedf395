"""Check that a built wheel holds the milcell package (with py.typed) and nothing else at top level."""

from __future__ import annotations

import sys
import zipfile

wheel = sys.argv[1]
names = zipfile.ZipFile(wheel).namelist()
top = {n.split("/", 1)[0] for n in names}
extra = {t for t in top if t != "milcell" and not t.endswith(".dist-info")}
if extra:
    sys.exit(f"{wheel}: unexpected top-level entries {sorted(extra)}")
if "milcell/py.typed" not in names:
    sys.exit(f"{wheel}: milcell/py.typed is missing")
print(f"{wheel}: {len(names)} files, top level {sorted(top)}")
