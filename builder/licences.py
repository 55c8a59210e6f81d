"""The licences Debian states for each installed package: the `License:` fields of its machine-readable
copyright file (DEP-5, /usr/share/doc/<package>/copyright: the one file a rootfs keeps there), as SPDX license
expressions where every name has an SPDX id, else as Debian wrote them."""

from __future__ import annotations

import re
import tarfile

MAX_COPYRIGHT_BYTES = 1 << 20  # a copyright file larger than this is not read (none in Debian comes close)

# Debian's short names (DEP-5) -> SPDX license ids; `+` means "or later"
SPDX_IDS = {
    "Apache-2.0": "Apache-2.0", "Artistic": "Artistic-1.0-Perl", "Artistic-1.0": "Artistic-1.0",
    "Artistic-2.0": "Artistic-2.0", "BSD-2-clause": "BSD-2-Clause", "BSD-3-clause": "BSD-3-Clause",
    "BSD-4-clause": "BSD-4-Clause", "BSL-1.0": "BSL-1.0", "CC0-1.0": "CC0-1.0", "CC-BY-3.0": "CC-BY-3.0",
    "CC-BY-4.0": "CC-BY-4.0", "CC-BY-SA-3.0": "CC-BY-SA-3.0", "CC-BY-SA-4.0": "CC-BY-SA-4.0",
    "Expat": "MIT", "MIT": "MIT", "FSFAP": "FSFAP", "FSFUL": "FSFUL", "FSFULLR": "FSFULLR", "GFDL-1.2": "GFDL-1.2-only",
    "GFDL-1.3": "GFDL-1.3-only", "GPL-1": "GPL-1.0-only", "GPL-1+": "GPL-1.0-or-later", "GPL-2": "GPL-2.0-only",
    "GPL-2+": "GPL-2.0-or-later", "GPL-3": "GPL-3.0-only", "GPL-3+": "GPL-3.0-or-later", "ISC": "ISC",
    "LGPL-2": "LGPL-2.0-only", "LGPL-2+": "LGPL-2.0-or-later", "LGPL-2.1": "LGPL-2.1-only",
    "LGPL-2.1+": "LGPL-2.1-or-later", "LGPL-3": "LGPL-3.0-only", "LGPL-3+": "LGPL-3.0-or-later",
    "MPL-1.1": "MPL-1.1", "MPL-2.0": "MPL-2.0", "OpenSSL": "OpenSSL", "PSF-2": "PSF-2.0", "Python-2.0": "Python-2.0",
    "X11": "X11", "Zlib": "Zlib", "zlib": "Zlib", "curl": "curl",
    "AGPL-3": "AGPL-3.0-only", "AGPL-3+": "AGPL-3.0-or-later", "Unicode-DFS-2016": "Unicode-DFS-2016",
    "OFL-1.1": "OFL-1.1", "WTFPL": "WTFPL", "Unlicense": "Unlicense", "0BSD": "0BSD", "Apache-2": "Apache-2.0",
    "GPL-2.0+": "GPL-2.0-or-later", "GPL-2.0": "GPL-2.0-only", "GPL-3.0+": "GPL-3.0-or-later",
    "GPL-3.0": "GPL-3.0-only", "LGPL-2.1-or-later": "LGPL-2.1-or-later", "RSA-MD": "RSA-MD", "Beerware": "Beerware",
    "Artistic-1": "Artistic-1.0", "bzip2-1.0.6": "bzip2-1.0.6", "MIT-0": "MIT-0", "Sleepycat": "Sleepycat",
}
# Debian's names and SPDX's own ids, whatever their case (`BSD-3-Clause`, `ZLIB`, `Zlib`)
_BY_NAME = {**{v.lower(): v for v in SPDX_IDS.values()}, **{k.lower(): v for k, v in SPDX_IDS.items()}}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")


def stated(copyright_text: str) -> list[str]:
    """The licence names of a DEP-5 copyright file's `License:` fields, in order, once each (none for a free-form
    file). `A or B` and `A and B` give both names."""
    if not copyright_text.startswith("Format:"):
        return []
    names: list[str] = []
    for line in copyright_text.splitlines():
        if line.startswith("License:"):
            for name in re.split(r"\s+(?:or|and|with)\s+|\s*[|,]\s*", line[len("License:"):].strip()):
                name = name.strip("() ")
                if NAME.fullmatch(name) and name not in names:
                    names.append(name)
    return names


def spdx_expression(names: list[str]) -> str | None:
    """`A AND B` in SPDX ids when every name has one (a package's files are under all of them), else None."""
    ids = [_BY_NAME.get(n.lower()) for n in names]
    if not ids or None in ids:
        return None
    unique = list(dict.fromkeys(i for i in ids if i))
    return " AND ".join(unique)


def from_doc_tree(tar: tarfile.TarFile) -> dict[str, list[str]]:
    """Package -> stated licence names, from a tar stream of /usr/share/doc (as the engine exports it)."""
    found: dict[str, list[str]] = {}
    shared: dict[str, str] = {}  # a package whose doc folder links to another's (same source: openssh-server)
    for member in tar:
        parts = member.name.split("/")
        if len(parts) == 2 and member.issym() and "/" not in member.linkname:
            shared[parts[1]] = member.linkname
        elif len(parts) == 3 and parts[2] == "copyright" and member.isfile() and member.size <= MAX_COPYRIGHT_BYTES:
            data = tar.extractfile(member)
            if data is not None and (names := stated(data.read().decode("utf-8", "replace"))):
                found[parts[1]] = names
    return {**{pkg: found[target] for pkg, target in shared.items() if target in found}, **found}
