# maculaos-sdk developer entry points. `make setup` once, then `make image`, `make run`, `make test`.
PROFILE ?= core
ARCH ?= amd64
VENV := .venv/bin
VERSION := $(shell sed -n 's/^version: *//p' profiles/$(PROFILE).yaml 2>/dev/null)

# `make build` builds every arch; `ARCH=arm64 make build` (or make build ARCH=arm64) one
ARCHES := $(if $(filter command line environment,$(origin ARCH)),$(ARCH),amd64 arm64)

.PHONY: setup image build iso rootfs qemu run test test-arm64 test-unit test-qemu lint bench doctor docs clean

setup:            ## install host packages, start dockerd, create .venv
	bash scripts/setup-host.sh

image:            ## build the ISO for PROFILE/ARCH into out/
	$(VENV)/maculaos-sdk build-image --profile $(PROFILE) --arch $(ARCH)

build:            ## build PROFILE's outputs for every arch (or ARCH=...) into out/ (spec 3.1)
	for arch in $(ARCHES); do $(VENV)/maculaos-sdk build-image --profile $(PROFILE) --arch $$arch || exit 1; done

iso:              ## the ISO of PROFILE/ARCH
	$(VENV)/maculaos-sdk build-image --profile $(PROFILE) --arch $(ARCH) --outputs iso

rootfs:           ## quick iteration: the root filesystem of PROFILE/ARCH only, as out/<basename>.rootfs.tar
	$(VENV)/maculaos-sdk build-image --profile $(PROFILE) --arch $(ARCH) --outputs tar

qemu: run         ## boot PROFILE/ARCH in QEMU (the dev VM)

run:              ## build PROFILE/ARCH if needed, boot it as a dev VM (serial console here; `maculaos-sdk vm ssh`)
	$(VENV)/maculaos-sdk vm start --profile $(PROFILE) --arch $(ARCH)

TEST_WORKERS ?= auto

test:             ## lint + unit tests + real QEMU boot tests, amd64 and arm64, one worker per core
	sh scripts/lint.sh
	$(VENV)/python -m pytest -v -rA -n $(TEST_WORKERS) --dist worksteal --durations=25 tests

test-arm64:       ## arm64 + Raspberry Pi 4: builds (rootfs emulated), UEFI boots under -M virt, SD card checks
	$(VENV)/python -m pytest -v -rA tests/qemu/arm64

test-unit:
	$(VENV)/python -m pytest -q tests --ignore=tests/qemu

test-qemu:
	$(VENV)/python -m pytest -v -rA -n $(TEST_WORKERS) --dist worksteal tests/qemu

lint:             ## ruff, mypy, and shellcheck on every shell file and the rendered /init (scripts/lint.sh)
	sh scripts/lint.sh

bench:            ## cold/warm/overlay rebuild times, ISO size, seconds to shell
	$(VENV)/python bench/build.py

doctor:
	$(VENV)/maculaos-sdk doctor

docs:             ## regenerate docs/profile-reference.md, docs/config-reference.md and README's stage graph
	$(VENV)/maculaos-sdk profile stages > README.stages
	awk '/^<!-- stages:/ {print; system("cat README.stages"); skip=1; next} /^<!-- \/stages -->/ {skip=0} !skip' \
	  README.md > README.tmp && mv README.tmp README.md && rm README.stages
	{ sed -n '1,5p' docs/profile-reference.md; $(VENV)/maculaos-sdk profile keys; } > docs/profile-reference.tmp
	mv docs/profile-reference.tmp docs/profile-reference.md
	{ sed -n '1,/^<!-- generated/p' docs/config-reference.md; $(VENV)/maculaos-sdk config reference; } > docs/config-reference.tmp
	mv docs/config-reference.tmp docs/config-reference.md

clean:
	rm -rf out .cache
