#!/usr/bin/env bash
# `make deb`: build/accelguard_<version>_<arch>.deb for Debian 12, from the files git lists.
#
# What the package holds (docs/operations.md, "Install"):
#   /opt/accelguard/                 a virtualenv of Debian's own python3.X: accelguard and its
#                                    Python dependencies (the `tpm` extra included), byte-compiled
#   /opt/accelguard/lib/libaccelguard-ima.so        native/imafast (the IMA parser's fast path)
#   /opt/accelguard/lib/nvml-sim/libnvidia-ml.so.1  native/nvml-sim, and
#   /opt/accelguard/lib/dcmi-sim/libdcmi.so         native/dcmi-sim, for `accelguard sim init`
#                                    only: outside every loader path, so they never stand in for
#                                    the drivers' libraries
#   /usr/bin/accelguard              -> /opt/accelguard/bin/accelguard
#   /lib/systemd/system/accelguard.service          systemd/accelguard.service, as it is
#   /etc/accelguard/agent.toml       conffile: agent/config_template.toml (`config init` writes it)
#   /usr/lib/accelguard/slurm/       prolog, epilog (packaging/slurm) and accelguard_spank.so
#                                    (native/slurm-spank): the Slurm hooks (docs/slurm.md)
#   /usr/share/doc/accelguard/       README.md, docs/ (the unit's Documentation= names
#                                    operations.md there), copyright
#
# Inputs are the files `git ls-files` lists under PACKAGED below, copied to build/deb/src first:
# build outputs, virtualenvs and caches in the checkout never reach the package. Files git does
# not track yet but would (not ignored) are included and named, so a new module works before its
# commit; a clean clone (CI) has none.
#
# The virtualenv is made in the staging tree with Debian's python3 (--without-pip) and filled by
# a separate build virtualenv's pip (--python); the absolute staging path in its scripts and
# pyvenv.cfg is then rewritten to /opt/accelguard, and the build fails if the staging path is
# left anywhere in the tree. Byte-code is compiled with the installed path (compileall -s/-p).
# Runtime Depends come from dpkg-shlibdeps over every ELF file, plus the libraries loaded with
# dlopen that it cannot see.
#
# Kept between builds (seconds when only accelguard changed): build/deb/buildenv (pip and
# hatchling) and build/deb/wheelhouse (the dependencies' wheels, rebuilt when pyproject.toml
# changes).
set -euo pipefail
cd "$(dirname "$0")/../.."

WORK=build/deb
PREFIX=/opt/accelguard
PACKAGED=(agent native/imafast native/nvml-sim native/dcmi-sim native/slurm-spank native/scrub systemd docs packaging pyproject.toml README.md)
MAINTAINER=${DEB_MAINTAINER:-accelguard developers <root@localhost>}

say() { printf 'make deb: %s\n' "$*"; }
fail() { printf 'make deb: error: %s\n' "$*" >&2; exit 1; }

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' agent/__init__.py)
[ -n "$VERSION" ] || fail "no __version__ in agent/__init__.py"
# PEP 440 pre-releases sort before the release; in Debian "~" does that: 1.0rc1 -> 1.0~rc1.
DEB_VERSION=$(printf '%s' "$VERSION" | sed -E 's/\.?(a|b|rc|dev)([0-9]*)$/~\1\2/')
ARCH=$(dpkg --print-architecture)
NAME=build/accelguard_${DEB_VERSION}_${ARCH}.deb
if [ "${1:-}" = --name ]; then
	printf '%s\n' "$NAME"
	exit 0
fi
[ "${1:-}" = "$NAME" ] || fail "usage: packaging/deb/build.sh $NAME (or --name)"

command -v dpkg-deb >/dev/null || fail "dpkg-deb is missing (Debian package dpkg)"
command -v dpkg-shlibdeps >/dev/null || fail "dpkg-shlibdeps is missing (Debian package dpkg-dev)"
git rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
	fail "not a git checkout: the package is built from the files git lists"
PROJECT_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)
[ "$VERSION" = "$PROJECT_VERSION" ] ||
	fail "agent/__init__.py says $VERSION, pyproject.toml says $PROJECT_VERSION"

# Debian's interpreter, never the one first on PATH (a pyenv or a venv): the package depends on
# the Debian package that provides it, and the virtualenv's C extensions are built for its ABI.
PYTHON=$(readlink -f /usr/bin/python3)
[ -x "$PYTHON" ] || fail "/usr/bin/python3 is missing (Debian package python3)"
PYVER=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYPACKAGE=$(dpkg-query -S "$PYTHON" 2>/dev/null | cut -d: -f1 | head -n1)
[ "$PYPACKAGE" = "python$PYVER-minimal" ] || fail "$PYTHON does not come from python$PYVER-minimal"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || fail "python$PYVER-venv is not installed"

# One build at a time (two test workers, or a test and a person): the second waits, then builds
# the same package again.
mkdir -p build
exec 9>build/.deb.lock
flock 9

# --- sources: what git lists, nothing else --------------------------------------------------
say "sources"
rm -rf "$WORK/src"
mkdir -p "$WORK/src"
untracked=$(git ls-files --others --exclude-standard -- "${PACKAGED[@]}")
if [ -n "$untracked" ]; then
	say "note: packaging files git does not track yet:" $untracked
fi
git ls-files -z --cached --others --exclude-standard -- "${PACKAGED[@]}" |
	while IFS= read -r -d '' path; do
		# A tracked file deleted in the work tree is not packaged.
		if [ -e "$path" ] || [ -L "$path" ]; then printf '%s\0' "$path"; fi
	done | tar --null --files-from=- --create --file=- | tar --extract --file=- -C "$WORK/src"

# --- the build virtualenv (pip, hatchling), and the wheels ----------------------------------
BUILDENV=$WORK/buildenv
if [ ! -e "$BUILDENV/.ready-$PYVER" ]; then
	say "build virtualenv (python$PYVER, hatchling)"
	rm -rf "$BUILDENV"
	"$PYTHON" -m venv "$BUILDENV"
	"$BUILDENV/bin/python" -m pip install -q --disable-pip-version-check 'hatchling>=1.25'
	touch "$BUILDENV/.ready-$PYVER"
fi
PIP=("$BUILDENV/bin/python" -m pip --disable-pip-version-check)

say "wheel"
rm -rf "$WORK/dist"
"${PIP[@]}" wheel -q --no-deps --no-build-isolation --wheel-dir "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/accelguard-*.whl)

# The dependencies' wheels, pinned by pyproject.toml: fetched (or built: tpm2-pytss compiles
# against libtss2-dev) once per pyproject.toml and interpreter.
WHEELHOUSE=$WORK/wheelhouse
key="$(sha256sum pyproject.toml | cut -d' ' -f1) python$PYVER"
if [ "$(cat "$WHEELHOUSE/.key" 2>/dev/null)" != "$key" ]; then
	say "dependency wheels"
	rm -rf "$WHEELHOUSE"
	"${PIP[@]}" wheel -q --wheel-dir "$WHEELHOUSE" "$WHEEL[tpm]"
	rm -f "$WHEELHOUSE"/accelguard-*.whl
	printf '%s\n' "$key" >"$WHEELHOUSE/.key"
fi

# --- the staging tree ------------------------------------------------------------------------
say "virtualenv in $PREFIX"
rm -rf "$WORK/debian"
mkdir -p "$WORK/debian"
ROOT=$(realpath "$WORK")/debian/accelguard
VENV=$ROOT$PREFIX
"$PYTHON" -m venv --without-pip "$VENV"
# By name from these two directories only: our wheel is the only accelguard there.
"${PIP[@]}" --python "$VENV/bin/python" install -q --no-index --no-compile \
	--find-links "$WORK/dist" --find-links "$WHEELHOUSE" "accelguard[tpm]==$VERSION"
rm -f "$VENV"/bin/Activate.ps1

# native/: built from the copied sources with fixed flags (a sanitizer build in the checkout
# never reaches the package).
say "native libraries"
NATIVE_CFLAGS="-O2 -fstack-protector-strong -D_FORTIFY_SOURCE=2 -Wl,-z,relro -Wl,-z,now"
make -s -C "$WORK/src/native/imafast" CFLAGS="$NATIVE_CFLAGS" >/dev/null
make -s -C "$WORK/src/native/nvml-sim" CFLAGS="$NATIVE_CFLAGS" >/dev/null
make -s -C "$WORK/src/native/dcmi-sim" CFLAGS="$NATIVE_CFLAGS" >/dev/null
install -D -m 0644 "$WORK/src/native/imafast/build/libaccelguard-ima.so" \
	"$VENV/lib/libaccelguard-ima.so"
install -D -m 0644 "$WORK/src/native/nvml-sim/build/libnvidia-ml.so.1" \
	"$VENV/lib/nvml-sim/libnvidia-ml.so.1"
install -D -m 0644 "$WORK/src/native/dcmi-sim/build/libdcmi.so" "$VENV/lib/dcmi-sim/libdcmi.so"
strip --strip-unneeded "$VENV/lib/libaccelguard-ima.so" "$VENV/lib/nvml-sim/libnvidia-ml.so.1" \
	"$VENV/lib/dcmi-sim/libdcmi.so"
# Where the agent looks for them today: beside the package, as in a checkout
# (agent/attest/logs/ima_native.py CHECKOUT_LIBRARY, agent/sim/node.py NVML_SIM_LIBRARY,
# agent/sim/npu.py DCMI_SIM_LIBRARY).
SITE=$VENV/lib/python$PYVER/site-packages
mkdir -p "$SITE/native/imafast/build" "$SITE/native/nvml-sim/build" "$SITE/native/dcmi-sim/build"
ln -sr "$VENV/lib/libaccelguard-ima.so" "$SITE/native/imafast/build/libaccelguard-ima.so"
ln -sr "$VENV/lib/nvml-sim/libnvidia-ml.so.1" "$SITE/native/nvml-sim/build/libnvidia-ml.so.1"
ln -sr "$VENV/lib/dcmi-sim/libdcmi.so" "$SITE/native/dcmi-sim/build/libdcmi.so"

# The staging path -> /opt/accelguard in the virtualenv's scripts and pyvenv.cfg.
ROOT_PATTERN=$(printf '%s' "$ROOT" | sed 's/[][\\.*^$#]/\\&/g')
grep -rlIF --null "$ROOT" "$VENV" | xargs -0 --no-run-if-empty sed -i "s#$ROOT_PATTERN##g"
say "byte-compiling"
"$VENV/bin/python" -m compileall -q -j0 -s "$ROOT" -p / "$VENV/lib" >/dev/null
leftover=$(grep -rlF "$ROOT" "$ROOT" || true)
[ -z "$leftover" ] || fail "the staging path is still in: $leftover"

mkdir -p "$ROOT/usr/bin"
ln -s "$PREFIX/bin/accelguard" "$ROOT/usr/bin/accelguard"
install -D -m 0644 "$WORK/src/systemd/accelguard.service" \
	"$ROOT/lib/systemd/system/accelguard.service"
install -d -m 0755 "$ROOT/etc/accelguard"
install -m 0644 "$WORK/src/agent/config_template.toml" "$ROOT/etc/accelguard/agent.toml"
SLURM=$ROOT/usr/lib/accelguard/slurm
install -D -m 0755 "$WORK/src/packaging/slurm/prolog" "$SLURM/prolog"
install -m 0755 "$WORK/src/packaging/slurm/epilog" "$SLURM/epilog"
make -s -C "$WORK/src/native/slurm-spank" CFLAGS="$NATIVE_CFLAGS" >/dev/null
[ -f "$WORK/src/native/slurm-spank/build/accelguard_spank.so" ] ||
	fail "the SPANK plugin was not built: install libslurm-dev"
install -m 0644 "$WORK/src/native/slurm-spank/build/accelguard_spank.so" "$SLURM/"
strip --strip-unneeded "$SLURM/accelguard_spank.so"
DOC=$ROOT/usr/share/doc/accelguard
install -d -m 0755 "$DOC"
cp -R "$WORK/src/docs/." "$DOC/"
install -m 0644 "$WORK/src/README.md" "$WORK/src/packaging/deb/copyright" "$DOC/"

# --- control ---------------------------------------------------------------------------------
say "control"
mkdir -p "$ROOT/DEBIAN"
for script in postinst prerm postrm; do
	install -m 0755 "$WORK/src/packaging/deb/$script" "$ROOT/DEBIAN/$script"
done
printf '/etc/accelguard/agent.toml\n' >"$ROOT/DEBIAN/conffiles"
chmod -R u+rwX,go+rX,go-w "$ROOT"

# dpkg-shlibdeps reads debian/control and expects the files under debian/<package>/.
printf 'Source: accelguard\n\nPackage: accelguard\nArchitecture: any\n' >"$WORK/debian/control"
mapfile -d '' elves < <(find "$ROOT" -type f \( -name '*.so' -o -name '*.so.*' \) -print0)
shlibs=$(cd "$WORK" && dpkg-shlibdeps -O --warnings=0 "${elves[@]}")
shlibs=${shlibs#shlibs:Depends=}
# Loaded with dlopen, which dpkg-shlibdeps cannot see: pyudev's libudev (ctypes), and the TPM
# access library that tpm2-pytss's TCTI loader opens for attest.tcti = "device:...".
depends="python$PYVER, $shlibs, libudev1, libtss2-tcti-device0"
installed_size=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
sed -e "s|@VERSION@|$DEB_VERSION|" -e "s|@ARCH@|$ARCH|" -e "s|@MAINTAINER@|$MAINTAINER|" \
	-e "s|@DEPENDS@|$depends|" -e "s|@INSTALLED_SIZE@|$installed_size|" \
	"$WORK/src/packaging/deb/control.in" >"$ROOT/DEBIAN/control"
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
	xargs -0 md5sum >DEBIAN/md5sums)
chmod 0644 "$ROOT/DEBIAN/control" "$ROOT/DEBIAN/conffiles" "$ROOT/DEBIAN/md5sums"

say "$NAME"
# gzip: xz takes a minute for this tree on two cores, gzip a few seconds.
dpkg-deb --root-owner-group -Zgzip -z6 --build "$ROOT" "$NAME.tmp" >/dev/null
mv -f "$NAME.tmp" "$NAME"
