#!/usr/bin/env bash
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds the real `cloud-hypervisor` and `ch-remote` from the pinned Cloud
# Hypervisor sources (vmm-glue/cloud-hypervisor/sources.env):
#
#   upstream  the pinned commit as it is, for comparison;
#   patched   the same commit with our series (vmm-glue/cloud-hypervisor/
#             patches/*.patch, in order) applied, which links this
#             repository's xe-vf-glue and xe-vf-plugin into the VMM.
#
# Sources, first that applies (--source):
#   vendor    ../shared/vendor/*.tar.gz beside the repository (offline, CI),
#             checked against their sha256;
#   git       clones of the pinned commits (a user's machine);
#   DIR       a Cloud Hypervisor source tree the user names (its micro-http
#             comes from the vendor tarball if present, else from git).
#
# The builds use `cargo build --locked` and are cached outside the clone
# (XE_CACHE_DIR, default ~/.cache/xe-vf-migration): one cargo target
# directory shared by both flavours (dependencies are compiled once), one
# source tree per flavour kept under a private git index so that a changed
# series rewrites only the files it touches (cargo rebuilds only those
# crates), and the finished binaries keyed by everything that went into
# them (sources, series, our crates, toolchain, profile). A build whose key
# is cached costs nothing.
#
# Results: <out>/<flavour>/{cloud-hypervisor,ch-remote,cloud-hypervisor.yaml,
# BUILD-INFO}, <out> defaulting to <repo>/target/cloud-hypervisor; the
# patched flavour also installs the sources of its vm-migration crate in
# <out>/patched/vm-migration-src/, which the mirror's drift test
# (vmm-glue/vm-migration/tests/drift/) compares our stand-in with.
#
# With --test, the patched tree's tests then run: Cloud Hypervisor's own
# tests of the crates the series touches (vm-migration, pci, vmm's unit
# tests with the --device parsing and the series' own tests, the
# cloud-hypervisor binary's CLI tests), and xe-vf-glue's and
# migration-ext's tests compiled against the patched tree's real
# vm-migration crate instead of our stand-in (a scratch workspace holding
# copies of plugin/ and vmm-glue/).
#
# To work on the series: --dev-tree DIR lays out DIR/cloud-hypervisor as a
# git repository at the pinned commit with one commit per patch (and this
# repository linked as DIR/xe-vf-migration); edit, commit, rebase there,
# then --export-series DIR writes the commits back as the patch series.
#
# Usage: scripts/build-cloud-hypervisor.sh [--flavor upstream|patched|all]
#            [--source auto|vendor|git|DIR] [--profile release|PROFILE]
#            [--out DIR] [--print-dir] [--test]
#        scripts/build-cloud-hypervisor.sh --dev-tree DIR | --export-series DIR
# Environment: XE_CACHE_DIR, XE_CH_VENDOR_DIR (default <repo>/../shared/vendor),
#   CARGO_BUILD_JOBS.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
SERIES_DIR="$REPO/vmm-glue/cloud-hypervisor"
# shellcheck source=../vmm-glue/cloud-hypervisor/sources.env
. "$SERIES_DIR/sources.env"

# Bumped when this script changes how a build is made (part of every key).
RECIPE=5

FLAVOR=all
SOURCE=auto
PROFILE=release
OUT="$REPO/target/cloud-hypervisor"
PRINT_DIR=0
RUN_TESTS=0
DEV_TREE=
EXPORT_FROM=
VENDOR_DIR="${XE_CH_VENDOR_DIR:-$REPO/../shared/vendor}"
CACHE="${XE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/xe-vf-migration}/cloud-hypervisor"

log() { echo "[build-ch] $*" >&2; }
die() {
    echo "[build-ch] ERROR: $*" >&2
    exit 1
}
usage() {
    sed -n '/^# Usage:/,/^#   CARGO_BUILD_JOBS/p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

while [ $# -gt 0 ]; do
    case "$1" in
    --flavor) FLAVOR=${2:?--flavor needs a value}; shift 2 ;;
    --source) SOURCE=${2:?--source needs a value}; shift 2 ;;
    --profile) PROFILE=${2:?--profile needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --print-dir) PRINT_DIR=1; shift ;;
    --test) RUN_TESTS=1; shift ;;
    --dev-tree) DEV_TREE=${2:?--dev-tree needs a directory}; shift 2 ;;
    --export-series) EXPORT_FROM=${2:?--export-series needs a directory}; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "unknown argument '$1'" >&2; usage ;;
    esac
done

case "$FLAVOR" in
upstream) FLAVORS=(upstream) ;;
patched) FLAVORS=(patched) ;;
all) FLAVORS=(upstream patched) ;;
*) die "--flavor '$FLAVOR': expected upstream, patched or all" ;;
esac
shopt -s nullglob
PATCHES=("$SERIES_DIR"/patches/*.patch)
shopt -u nullglob
if [ "${#PATCHES[@]}" -eq 0 ]; then
    [ "$FLAVOR" = patched ] && die "no patches in $SERIES_DIR/patches"
    FLAVORS=(upstream)
fi

for tool in git tar sha256sum cargo flock; do
    command -v "$tool" >/dev/null || die "'$tool' is needed"
done
mkdir -p "$CACHE" "$OUT"
exec 9>"$CACHE/.lock"
flock 9 # one build at a time per cache

now() { date +%s; }
sha() { sha256sum | cut -c1-64; }

check_sha256() {
    local file=$1 want=$2 got
    got=$(sha256sum "$file" | cut -c1-64)
    [ "$got" = "$want" ] || die "$file: sha256 $got, expected $want (not the pinned sources)"
}

if [ "$SOURCE" = auto ]; then
    if [ -f "$VENDOR_DIR/$CH_TARBALL" ]; then SOURCE=vendor; else SOURCE=git; fi
fi

# ------------------------------------------------------------------ sources

# Clones (or updates) a bare mirror holding `commit`; prints its git dir.
git_mirror() {
    local url=$1 commit=$2 name=$3 dir="$CACHE/git/$3.git"
    if ! git --git-dir="$dir" cat-file -e "$commit^{commit}" 2>/dev/null; then
        log "fetching $name $commit from $url"
        [ -d "$dir" ] || git init -q --bare "$dir"
        git --git-dir="$dir" fetch -q --depth 1 "$url" "$commit" ||
            git --git-dir="$dir" fetch -q "$url" ||
            die "cannot fetch $commit from $url"
        git --git-dir="$dir" cat-file -e "$commit^{commit}" ||
            die "$url has no commit $commit"
    fi
    echo "$dir"
}

# Unpacks micro-http into a cargo directory source; prints its directory.
micro_http_source() {
    local dir="$CACHE/micro-http-$MICRO_HTTP_COMMIT"
    if [ ! -f "$dir/micro_http/.cargo-checksum.json" ]; then
        rm -rf "$dir" && mkdir -p "$dir/micro_http"
        if [ -f "$VENDOR_DIR/$MICRO_HTTP_TARBALL" ]; then
            check_sha256 "$VENDOR_DIR/$MICRO_HTTP_TARBALL" "$MICRO_HTTP_SHA256"
            tar -xzf "$VENDOR_DIR/$MICRO_HTTP_TARBALL" -C "$dir/micro_http" --strip-components=1
        else
            local mirror
            mirror=$(git_mirror "$MICRO_HTTP_REPO" "$MICRO_HTTP_COMMIT" micro-http)
            git --git-dir="$mirror" archive "$MICRO_HTTP_COMMIT" | tar -x -C "$dir/micro_http"
        fi
        # A directory source replacing a git source carries no package checksum.
        echo '{"files":{},"package":null}' >"$dir/micro_http/.cargo-checksum.json"
    fi
    echo "$dir"
}

# Makes the pristine sources a commit in the flavour's private git dir and
# prints its id. For git sources that is the pinned commit itself.
pristine_commit() {
    local gitdir=$1 tmp tree
    case "$SOURCE" in
    git)
        local mirror
        mirror=$(git_mirror "$CH_REPO" "$CH_COMMIT" cloud-hypervisor)
        git --git-dir="$gitdir" fetch -q "$mirror" "$CH_COMMIT"
        echo "$CH_COMMIT"
        return
        ;;
    vendor)
        check_sha256 "$VENDOR_DIR/$CH_TARBALL" "$CH_SHA256"
        tmp=$(mktemp -d)
        tar -xzf "$VENDOR_DIR/$CH_TARBALL" -C "$tmp" --strip-components=1
        ;;
    *)
        [ -f "$SOURCE/Cargo.toml" ] && [ -d "$SOURCE/vmm" ] ||
            die "--source $SOURCE: not a Cloud Hypervisor source tree"
        tmp=$(mktemp -d)
        tar -C "$SOURCE" --exclude=./.git --exclude=./target -cf - . | tar -x -C "$tmp"
        ;;
    esac
    tree=$(GIT_INDEX_FILE="$gitdir/import-index" GIT_WORK_TREE="$tmp" \
        git --git-dir="$gitdir" add -A -f . >/dev/null &&
        GIT_INDEX_FILE="$gitdir/import-index" git --git-dir="$gitdir" write-tree)
    rm -rf "$tmp" "$gitdir/import-index"
    GIT_AUTHOR_DATE="1970-01-01T00:00:00Z" GIT_COMMITTER_DATE="1970-01-01T00:00:00Z" \
        git --git-dir="$gitdir" -c user.name=build -c user.email=build@localhost \
        commit-tree "$tree" -m "pristine sources ($SOURCE)"
}

# ------------------------------------------------------------------ keys

# Hash of the files of this repository the patched VMM compiles. Not our
# stand-in vm-migration: CH's workspace replaces it by its own crate.
our_crates_hash() {
    (cd "$REPO" && find Cargo.toml Cargo.lock plugin/Cargo.toml plugin/src vmm-glue \
        -type f -not -path '*/target/*' -not -path 'vmm-glue/vm-migration/*' |
        LC_ALL=C sort | xargs sha256sum) | sha
}

toolchain_id() { rustc -vV | sha; }

# ------------------------------------------------------------------ build

# Lays out the flavour's tree at `pristine` plus its patches; prints the tree.
prepare_tree() {
    local flavor=$1 pristine=$2 gitdir=$3 tree=$4
    git --git-dir="$gitdir" --work-tree="$tree" checkout -q -f --detach "$pristine"
    git --git-dir="$gitdir" --work-tree="$tree" clean -q -f -d -x
    if [ "$flavor" = patched ]; then
        # Our crates sit beside CH's tree, where the series' path
        # dependencies (../xe-vf-migration/...) expect them.
        ln -sfn "$REPO" "$(dirname "$tree")/xe-vf-migration"
        local p
        for p in "${PATCHES[@]}"; do
            git --git-dir="$gitdir" --work-tree="$tree" -C "$tree" apply --whitespace=nowarn "$p" ||
                die "$(basename "$p") does not apply to $CH_COMMIT"
        done
    fi
    prepare_cargo_config "$tree"
}

# micro_http from the pinned sources, Cargo.lock untouched.
prepare_cargo_config() {
    local tree=$1
    mkdir -p "$tree/.cargo"
    cat >"$tree/.cargo/config.toml" <<EOF
# Written by build-cloud-hypervisor.sh: micro_http from the pinned sources.
[source."$MICRO_HTTP_LOCK_SOURCE"]
git = "$MICRO_HTTP_REPO"
branch = "main"
replace-with = "pinned-micro-http"

[source.pinned-micro-http]
directory = "$MICRO_HTTP_DIR"
EOF
}

# The flavour's source tree. The patched one links this repository, so
# each repository (clone, worktree) gets a tree of its own: cargo then
# never mistakes another checkout's older files for unchanged ones.
tree_dir() {
    case "$1" in
    patched) echo "$CACHE/tree/patched-$(echo "$REPO" | sha | cut -c1-8)" ;;
    *) echo "$CACHE/tree/$1" ;;
    esac
}

# Lays out the flavour's tree for the current inputs; prints its path.
ensure_tree() {
    local flavor=$1 dir
    dir=$(tree_dir "$flavor")
    local gitdir="$dir.git" tree="$dir/cloud-hypervisor" pristine
    [ -d "$gitdir" ] || git init -q --bare "$gitdir"
    mkdir -p "$tree"
    pristine=$(pristine_commit "$gitdir")
    # Laid out again only when its inputs changed, so cargo sees no
    # needlessly touched files.
    local stamp="$pristine $MICRO_HTTP_DIR"
    [ "$flavor" = patched ] && stamp="$stamp $(cat "${PATCHES[@]}" | sha)"
    if [ "$(cat "$dir/.prepared" 2>/dev/null)" != "$stamp" ]; then
        rm -f "$dir/.prepared"
        prepare_tree "$flavor" "$pristine" "$gitdir" "$tree" >&2
        echo "$stamp" >"$dir/.prepared"
    fi
    echo "$tree"
}

# Runs cargo in a flavour's tree, with the shared target directory.
tree_cargo() {
    local tree=$1
    shift
    (cd "$tree" && GIT_CEILING_DIRECTORIES="$(dirname "$tree")" \
        CARGO_TARGET_DIR="$CACHE/target" cargo "$@")
}

# rust-vmm crates (and CH's vm-migration) of which the patched binary must
# link one copy: our crates take CH's versions, so that one VFIO stack and
# one set of migration traits serve both.
SINGLE_COPY_CRATES=(vfio-ioctls vfio-bindings iommufd-bindings iommufd-ioctls vm-migration
    vm-memory vmm-sys-util kvm-ioctls kvm-bindings mshv-ioctls mshv-bindings linux-loader
    vhost virtio-bindings virtio-queue event-manager acpi_tables vm-fdt)

# Fails when the patched tree depends on a second copy of one of them.
check_single_copies() {
    local tree=$1 duplicates name found=()
    duplicates=$(tree_cargo "$tree" tree --locked --duplicates --depth 0 --edges normal,build \
        --format '{p}' | sed -n 's/^\([^ ]*\) v.*/\1/p' | sort -u) ||
        die "patched: cargo tree --duplicates failed"
    for name in "${SINGLE_COPY_CRATES[@]}"; do
        grep -qx "$name" <<<"$duplicates" && found+=("$name")
    done
    if [ "${#found[@]}" -gt 0 ]; then
        die "patched: more than one version of ${found[*]} in the tree (cargo tree -d -i ${found[0]} shows why); our crates must use Cloud Hypervisor's"
    fi
    log "patched: one copy each of the rust-vmm crates (${#SINGLE_COPY_CRATES[@]} checked)"
}

build_flavor() {
    local flavor=$1 key=$2 bin="$CACHE/bin/$1-$2"
    if [ -x "$bin/cloud-hypervisor" ] && [ -x "$bin/ch-remote" ]; then
        log "$flavor: cached ($bin)"
    else
        local started tree
        started=$(now)
        tree=$(ensure_tree "$flavor")
        [ "$flavor" = patched ] && check_single_copies "$tree"
        local extra=()
        [ "$flavor" = patched ] && extra=(--config "env.CH_EXTRA_VERSION=\"xe-vf\"")
        log "$flavor: cargo build --locked --profile $PROFILE --features ivshmem (cloud-hypervisor, ch-remote)"
        # ivshmem (CH's optional --ivshmem device): the xe-vfio-pci nested
        # test gives its L2 guest the VF's "VRAM" BAR through it. Inert
        # unless --ivshmem is given.
        tree_cargo "$tree" build --locked --profile "$PROFILE" "${extra[@]}" \
            --features ivshmem --bin cloud-hypervisor --bin ch-remote ||
            die "$flavor: cargo build failed"
        local built="$CACHE/target/$PROFILE"
        [ "$PROFILE" = dev ] && built="$CACHE/target/debug"
        rm -rf "$bin.tmp" && mkdir -p "$bin.tmp"
        cp "$built/cloud-hypervisor" "$built/ch-remote" "$bin.tmp/"
        # The API's OpenAPI description, for tests that check bodies against it.
        cp "$tree/vmm/src/api/openapi/cloud-hypervisor.yaml" "$bin.tmp/"
        # The contract crate as the series leaves it, for the mirror's drift test.
        if [ "$flavor" = patched ]; then
            cp -r "$tree/vm-migration/src" "$bin.tmp/vm-migration-src"
        fi
        {
            echo "flavor=$flavor"
            echo "key=$key"
            echo "source=$SOURCE"
            echo "cloud_hypervisor_commit=$CH_COMMIT"
            echo "micro_http_commit=$MICRO_HTTP_COMMIT"
            echo "profile=$PROFILE"
            echo "rustc=$(rustc -V)"
            if [ "$flavor" = patched ]; then
                local p
                for p in "${PATCHES[@]}"; do echo "patch=$(basename "$p")"; done
            fi
            echo "build_seconds=$(($(now) - started))"
        } >"$bin.tmp/BUILD-INFO"
        rm -rf "$bin" && mv "$bin.tmp" "$bin"
        log "$flavor: built in $(($(now) - started)) s"
    fi
    rm -rf "$OUT/$flavor.tmp" && mkdir -p "$OUT/$flavor.tmp"
    cp -r "$bin"/* "$OUT/$flavor.tmp/"
    rm -rf "${OUT:?}/$flavor" && mv "$OUT/$flavor.tmp" "$OUT/$flavor"
    [ "$PRINT_DIR" = 1 ] && echo "$OUT/$flavor"
    return 0
}

# The patched tree's tests, and xe-vf-glue's through the real traits.
run_tests() {
    local started tree
    started=$(now)
    tree=$(ensure_tree patched)
    log "patched: Cloud Hypervisor's tests of the crates the series touches"
    tree_cargo "$tree" test --locked -p vm-migration -p pci ||
        die "patched: vm-migration or pci tests failed"
    tree_cargo "$tree" test --locked -p vmm --features kvm --lib ||
        die "patched: vmm unit tests failed"
    tree_cargo "$tree" test --locked -p cloud-hypervisor --bin cloud-hypervisor ||
        die "patched: cloud-hypervisor CLI tests failed"

    log "patched: xe-vf-glue's and migration-ext's tests against the patched tree's vm-migration"
    local ws
    ws="$(dirname "$tree")/glue-real"
    rm -rf "$ws" && mkdir -p "$ws"
    tar -C "$REPO" --exclude=./plugin/fuzz --exclude=./vmm-glue/cloud-hypervisor \
        --exclude=./vmm-glue/vm-migration -cf - ./plugin ./vmm-glue | tar -x -C "$ws"
    cp "$REPO/Cargo.lock" "$ws/"
    {
        echo '# Written by build-cloud-hypervisor.sh: xe-vf-glue against CH'"'"'s vm-migration.'
        echo '[workspace]'
        echo 'resolver = "2"'
        echo 'members = ["plugin", "vmm-glue", "vmm-glue/migration-ext"]'
        echo
        sed -n '/^\[workspace.package\]/,/^\[patch.crates-io\]/p' "$REPO/Cargo.toml" | sed '$d'
        echo '[patch.crates-io]'
        echo "vm-migration = { path = \"$tree/vm-migration\" }"
    } >"$ws/Cargo.toml"
    (cd "$ws" && CARGO_TARGET_DIR="$CACHE/target-glue" cargo test -p xe-vf-glue -p migration-ext) ||
        die "xe-vf-glue's and migration-ext's tests against the real vm-migration failed"
    log "patched: tests passed in $(($(now) - started)) s"
}

# A development checkout of the patched tree: pinned sources as the first
# commit, one commit per patch.
make_dev_tree() {
    local dir=$1 tree="$1/cloud-hypervisor"
    [ -e "$tree" ] && die "--dev-tree: $tree exists already"
    mkdir -p "$tree"
    git -C "$tree" init -q
    local pristine
    pristine=$(pristine_commit "$tree/.git")
    local as_builder=(-c user.name=build -c user.email=build@localhost)
    git -C "$tree" reset -q --hard "$pristine"
    git -C "$tree" "${as_builder[@]}" commit -q --amend --allow-empty \
        -m "Cloud Hypervisor ${CH_COMMIT:0:12} (pinned sources)"
    git -C "$tree" tag series-base
    ln -sfn "$REPO" "$dir/xe-vf-migration"
    echo "/.cargo" >>"$tree/.git/info/exclude"
    if [ "${#PATCHES[@]}" -gt 0 ]; then
        git -C "$tree" "${as_builder[@]}" am -q --keep-cr "${PATCHES[@]}" ||
            die "the series does not apply"
    fi
    prepare_cargo_config "$tree"
    log "dev tree ready: $tree (series on top of tag series-base)"
}

# Writes the dev tree's commits after series-base back as the series.
export_series() {
    local tree="$1/cloud-hypervisor"
    git -C "$tree" rev-parse -q --verify series-base >/dev/null ||
        die "--export-series: $tree has no series-base tag (make it with --dev-tree)"
    rm -f "$SERIES_DIR"/patches/*.patch
    git -C "$tree" format-patch -q --zero-commit --no-signature \
        -o "$SERIES_DIR/patches" series-base..HEAD
    log "exported $(find "$SERIES_DIR/patches" -name '*.patch' | wc -l) patches"
}

MICRO_HTTP_DIR=$(micro_http_source)
if [ -n "$DEV_TREE" ]; then
    make_dev_tree "$DEV_TREE"
    exit 0
fi
if [ -n "$EXPORT_FROM" ]; then
    export_series "$EXPORT_FROM"
    exit 0
fi
case "$SOURCE" in
vendor | git) SOURCE_ID=$CH_COMMIT ;;
*) SOURCE_ID=$(tar -C "$SOURCE" --exclude=./.git --exclude=./target --sort=name \
    --mtime=@0 --owner=0 --group=0 -cf - . | sha) ;;
esac
BASE_KEY=$(printf '%s\n' "recipe=$RECIPE" "source=$SOURCE_ID" \
    "micro_http=$MICRO_HTTP_COMMIT" "profile=$PROFILE" "toolchain=$(toolchain_id)" | sha)

for flavor in "${FLAVORS[@]}"; do
    key=$BASE_KEY
    if [ "$flavor" = patched ]; then
        key=$(printf '%s\n' "$BASE_KEY" "$(cat "${PATCHES[@]}" | sha)" "$(our_crates_hash)" | sha)
    fi
    build_flavor "$flavor" "${key:0:16}"
done
if [ "$RUN_TESTS" = 1 ]; then
    [ "${#PATCHES[@]}" -gt 0 ] || die "--test: no patches to test"
    run_tests
fi
