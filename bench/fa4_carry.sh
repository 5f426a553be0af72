#!/usr/bin/env bash
# flash-attn-4 (FA4's CuTe kernels, SM90 forward+backward) for the lent GPU host, which has no internet and takes
# 64 MiB per call. Its CUDA 13 library wheel is 92 MB, so it travels re-packed (xz) in two parts over two calls
# made back to back (the host keeps /tmp while it stays warm).
#   here:   bash bench/fa4_carry.sh pack          -> fa4a/ (part 1) and fa4b/ (part 2 + the other wheels)
#   there:  bash bench/fa4_carry.sh stage         (call 1, carry fa4a: keeps part 1 in /tmp/fa4)
#           bash bench/fa4_carry.sh install       (call 2, carry fa4b: installs into /tmp/site)
#           export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages   (the package's .pth line)
# fa4a/ and fa4b/ must be git-ignored (.git/info/exclude).
set -euo pipefail
FA4_VERSION=4.0.0b36 CUTLASS_VERSION=4.8.1
case ${1:?pack|stage|install} in
pack)
    tmp=$(mktemp -d)
    for spec in flash-attn-4==$FA4_VERSION nvidia-cutlass-dsl==$CUTLASS_VERSION \
            nvidia-cutlass-dsl-libs-base==$CUTLASS_VERSION nvidia-cutlass-dsl-libs-core==$CUTLASS_VERSION \
            nvidia-cutlass-dsl-libs-cu13==$CUTLASS_VERSION apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 \
            quack-kernels==0.6.5; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
            -d "$tmp/wheels" "$spec"
    done
    mkdir -p "$tmp/cu13" fa4a fa4b/wheels
    (cd "$tmp/cu13" && unzip -q "$tmp"/wheels/nvidia_cutlass_dsl_libs_cu13-*.whl && rm "$tmp"/wheels/nvidia_cutlass_dsl_libs_cu13-*.whl)
    tar cf - -C "$tmp/cu13" . | xz -9e -T0 > "$tmp/cu13.tar.xz"   # 92 MB wheel -> 63.5 MB
    split -b 56000000 "$tmp/cu13.tar.xz" "$tmp/cu13part."
    mv "$tmp/cu13part.aa" fa4a/ && mv "$tmp/cu13part.ab" fa4b/ && mv "$tmp"/wheels/*.whl fa4b/wheels/
    rm -rf "$tmp"
    du -sh fa4a fa4b ;;
stage)
    mkdir -p /tmp/fa4 && cp fa4a/cu13part.aa /tmp/fa4/ ;;
install)
    mkdir -p /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site fa4b/wheels/*.whl
    cat /tmp/fa4/cu13part.aa fa4b/cu13part.ab | xz -d | tar x -C /tmp/site
    PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages python3 -c "import flash_attn.cute.interface" ;;
*) echo "usage: $0 pack|stage|install" >&2; exit 2 ;;
esac
