"""Debian packages as corpora: `apt-get download` + `dpkg-deb -x` into a cache, never installed.

Root is needed only for `apt-get update` on a machine whose package lists are empty. A metapackage
(e.g. `linux-doc`, `python3-doc`) is followed to the versioned package it depends on, so the demo
keeps working when the registry moves to a newer version.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nexus.data.cache import cached_dir
from nexus.errors import DataError

APT_LISTS = Path("/var/lib/apt/lists")
_METAPACKAGE_MAX_KB = 100


@dataclass(frozen=True)
class PackageInfo:
    name: str
    version: str
    depends: tuple[str, ...]
    installed_kb: int


def _run(cmd: list[str], cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise DataError(f"`{cmd[0]}` is not available: Debian sources need apt and dpkg") from err


def ensure_apt_lists() -> None:
    """Run `apt-get update` once if the package lists are empty (needs root)."""
    if any(APT_LISTS.glob("*_Packages*")):
        return
    if os.geteuid() != 0:
        raise DataError(f"the apt package lists in {APT_LISTS} are empty: run `sudo apt-get update` once")
    proc = _run(["apt-get", "update", "-qq"])
    if proc.returncode != 0:
        raise DataError(f"`apt-get update` failed: {proc.stderr.strip()[-500:]}")


_INFO: dict[str, PackageInfo] = {}  # per process: apt-cache parses all its lists on each call (~1 s)


def query_packages(names: list[str]) -> None:
    """Look up every name not seen yet with one `apt-cache show` call."""
    missing = sorted({n for n in names if n not in _INFO})
    if not missing:
        return
    ensure_apt_lists()
    proc = _run(["apt-cache", "show", "--no-all-versions", *missing])
    for record in proc.stdout.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", record, flags=re.MULTILINE))
        if "Package" not in fields or "Version" not in fields:
            continue
        depends = tuple(
            dep.split()[0].split(":")[0]
            for dep in fields.get("Depends", "").split(",")
            if dep.strip() and "|" not in dep
        )
        _INFO.setdefault(
            fields["Package"],
            PackageInfo(
                fields["Package"], fields["Version"], depends, int(fields.get("Installed-Size", "0"))
            ),
        )
    pointed = [dep for n in missing if n in _INFO and _is_metapackage(_INFO[n]) for dep in _INFO[n].depends]
    if pointed:
        query_packages(pointed)


def _is_metapackage(info: PackageInfo) -> bool:
    """A package this small that depends on others only points to them."""
    return bool(info.depends) and info.installed_kb < _METAPACKAGE_MAX_KB


def package_info(name: str, domain: str) -> PackageInfo:
    """Version and hard dependencies of the registry's candidate for `name`."""
    query_packages([name])
    if name not in _INFO:
        raise DataError(f"domain {domain!r}: Debian package {name!r} is not known to apt (apt-cache show)")
    return _INFO[name]


def resolve_package(name: str, domain: str) -> list[PackageInfo]:
    """The package(s) whose files hold the text: the package itself, or what a metapackage names."""
    info = package_info(name, domain)
    if _is_metapackage(info):
        return [package_info(dep, domain) for dep in info.depends]
    return [info]


def fetch_package(info: PackageInfo, cache_dir: Path, domain: str) -> Path:
    """Extracted tree of a package, downloaded at most once per version into `cache_dir/debian`."""
    safe_version = re.sub(r"[^A-Za-z0-9.+~-]", "_", info.version)
    target = Path(cache_dir) / "debian" / f"{info.name}_{safe_version}"

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".deb-") as work:
            proc = _run(["apt-get", "download", f"{info.name}={info.version}"], cwd=work)
            debs = list(Path(work).glob("*.deb"))
            if proc.returncode != 0 or not debs:
                raise DataError(
                    f"domain {domain!r}: `apt-get download {info.name}` failed: {proc.stderr.strip()[-500:]}"
                )
            proc = _run(["dpkg-deb", "-x", str(debs[0]), str(tmp)])
            if proc.returncode != 0:
                raise DataError(f"domain {domain!r}: cannot extract {debs[0]}: {proc.stderr.strip()}")

    cached_dir(target, info.version, build)
    return target
