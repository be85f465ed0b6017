#!/usr/bin/env bash
# Build the site bundle: `make package` and tests/packaging/test_bundle.py run this.
#
#   1. PyInstaller one-folder build of tessera-site (packaging/tessera-site.spec) into
#      dist/tessera-site/. Its work folder build/pyinstaller/ is kept between builds: PyInstaller
#      re-analyses only when a source changed, and caches what it does to binaries.
#   2. Strip the large native libraries that ship with their symbol tables (torch's): only
#      symbols go (--strip-unneeded), code and dynamic symbols stay.
#   3. Add the Linux desktop file, the icon and the install notes.
#   4. Pack dist/tessera-site-<version>-linux-<arch>.tar.gz (version from pyproject.toml) and
#      print the unpacked and compressed sizes against the goals.
#
# Environment: PYTHON (default .venv/bin/python, with the dev extra installed), DIST (default
# dist), WORK (default build/pyinstaller). A missing tool fails the build; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DIST=${DIST:-dist}
WORK=${WORK:-build/pyinstaller}
GOAL_UNPACKED_MB=850
GOAL_COMPRESSED_MB=320

for tool in strip tar gzip file; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "build.sh: missing tool '$tool' (Debian packages binutils, tar, gzip, file)" >&2
    exit 1
  fi
done
if ! "$PYTHON" -c "import PyInstaller" 2>/dev/null; then
  echo "build.sh: PyInstaller is not installed in $PYTHON; run 'make setup'" >&2
  exit 1
fi

version=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
case "$(uname -s)" in
  Linux) os=linux ;;
  *) echo "build.sh: only Linux bundles are built and tested so far (this is $(uname -s))" >&2; exit 1 ;;
esac
arch=$(uname -m)
name="tessera-site-$version-$os-$arch"
bundle="$DIST/tessera-site"
tarball="$DIST/$name.tar.gz"

started=$(date +%s)
"$PYTHON" -m PyInstaller --noconfirm --log-level WARN \
  --distpath "$DIST" --workpath "$WORK" packaging/tessera-site.spec
built=$(date +%s)

# 2. strip: ELF files above 4 MB that still carry a symbol table
stripped=0
while IFS= read -r -d '' lib; do
  if file -b "$lib" | grep -q 'ELF.*not stripped'; then
    strip --strip-unneeded "$lib"
    stripped=$((stripped + 1))
  fi
done < <(find "$bundle/_internal/torch" -type f -name '*.so*' -size +4M -print0)

# 3. desktop integration and notes (see docs/install-site.md)
cp packaging/linux/tessera-site.desktop packaging/linux/tessera-site.svg \
  packaging/linux/tessera-site.png "$bundle/"
cp packaging/README-bundle.txt "$bundle/README.txt"
echo "$version" > "$bundle/VERSION"

# 4. pack
rm -f "$tarball"
tar -C "$DIST" -cf - tessera-site | gzip -6 > "$tarball.part"
mv "$tarball.part" "$tarball"
done_at=$(date +%s)

unpacked=$(du -sb "$bundle" | cut -f1)
compressed=$(stat -c %s "$tarball")
mb() { echo $(( ($1 + 524288) / 1048576 )); }
echo "bundle:     $bundle ($stripped libraries stripped)"
echo "tarball:    $tarball"
echo "unpacked:   $(mb "$unpacked") MB (goal <= $GOAL_UNPACKED_MB MB)"
echo "compressed: $(mb "$compressed") MB (goal <= $GOAL_COMPRESSED_MB MB)"
echo "time:       $((built - started)) s PyInstaller, $((done_at - built)) s strip and pack"
echo "RESULT unpacked_mb=$(mb "$unpacked") compressed_mb=$(mb "$compressed") build_s=$((done_at - started))"
if [ "$(mb "$unpacked")" -gt "$GOAL_UNPACKED_MB" ] || [ "$(mb "$compressed")" -gt "$GOAL_COMPRESSED_MB" ]; then
  echo "build.sh: the bundle is larger than its goal" >&2
fi
