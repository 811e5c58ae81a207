# simplest-dist build.
#   make              MPI build (mpicc) with the CPU backend; the CUDA backend too when nvcc is found
#   make USE_MPI=0    single-process build, for a machine without Open MPI
#   make deps         install missing Debian packages (root) or print the apt-get command
#   make run          deps + build + train configs/fashion-mnist.json
#   make test         every test; prints "N passed, N failed"
#   make bench        benchmarks against PyTorch (tests/bench/)
# Extra paths for air-gapped GPU nodes: make EXTRA_CFLAGS=-I/opt/x/include EXTRA_LDFLAGS=-L/opt/x/lib

USE_MPI ?= 1
USE_CUDA ?= auto
ARCH ?= -march=native  # for a cluster whose nodes differ from the build host: ARCH=-march=x86-64-v3
OPT ?= -O3
BUILD ?= build
CONFIG ?= configs/fashion-mnist.json

PKGS := libcjson openblas lapacke zlib libjpeg libturbojpeg
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
ifeq ($(strip $(PKG_LIBS)),)
  PKG_LIBS := -lcjson -lopenblas -llapacke -lz -ljpeg -lturbojpeg
endif

CC := cc
ifeq ($(USE_MPI),1)
  ifeq ($(shell command -v mpicc 2>/dev/null),)
    $(warning mpicc not found: building without MPI (make deps installs Open MPI))
    USE_MPI := 0
  else
    CC := mpicc
  endif
endif

CFLAGS := -std=c11 $(OPT) -g $(ARCH) -fopenmp -Wall -Wextra -Wno-unused-parameter -D_GNU_SOURCE -Isrc $(PKG_CFLAGS) $(EXTRA_CFLAGS)
LDFLAGS := -fopenmp $(EXTRA_LDFLAGS)
LDLIBS := $(PKG_LIBS) -lm -lpthread
ifeq ($(USE_MPI),1)
  CFLAGS += -DUSE_MPI
endif

# CUDA: found from CUDA_HOME or from nvcc's location, never a hard-coded path.
NVCC := $(shell if [ -n "$$CUDA_HOME" ] && [ -x "$$CUDA_HOME/bin/nvcc" ]; then echo $$CUDA_HOME/bin/nvcc; else command -v nvcc 2>/dev/null; fi)
CUDA_SRCS := $(wildcard kernels/*.cu)
ifeq ($(USE_CUDA),auto)
  USE_CUDA := $(if $(and $(NVCC),$(CUDA_SRCS)),1,0)
endif
ifeq ($(USE_CUDA),1)
  CUDA_HOME_DIR := $(patsubst %/bin/nvcc,%,$(NVCC))
  NVCCFLAGS ?= -O3 -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  CFLAGS += -DUSE_CUDA -I$(CUDA_HOME_DIR)/include
  # cuSOLVER joins with GPU Shampoo roots.
  LDLIBS += -L$(CUDA_HOME_DIR)/lib64 -Wl,-rpath,$(CUDA_HOME_DIR)/lib64 -lcudart -lcublas -lcublasLt -lcusolver -lstdc++
  CUDA_OBJS := $(patsubst kernels/%.cu,$(BUILD)/kernels/%.o,$(CUDA_SRCS))
  # NCCL (the GPU gradient all-reduce, Shampoo's root broadcast), the first of: NCCL_HOME (include/, lib/) when
  # given; the toolkit's; the system's (libnccl-dev from NVIDIA's apt repository, as in the nvidia/cuda devel
  # images); pip's nvidia-nccl-cu13 or -cu12 (site-packages/nvidia/nccl, found through the python3 on the PATH).
  # USE_NCCL=0 builds without it; USE_NCCL=1 with EXTRA_CFLAGS/LDFLAGS names it by hand. Several ranks bootstrap it
  # over MPI; a single-process build (USE_MPI=0) uses it only with SD_NCCL_FORCE=1 (a one-rank communicator: the
  # NCCL path checked on a one-GPU machine). `make build-info` prints what was found.
  NCCL_SYSTEM_INC ?= /usr/include
  ifneq ($(NCCL_HOME),)
    NCCL_INC := $(if $(wildcard $(NCCL_HOME)/include/nccl.h),$(NCCL_HOME)/include,$(error NCCL_HOME=$(NCCL_HOME) has no include/nccl.h))
  else ifneq ($(wildcard $(CUDA_HOME_DIR)/include/nccl.h),)
    NCCL_INC := $(CUDA_HOME_DIR)/include
  else ifneq ($(wildcard $(NCCL_SYSTEM_INC)/nccl.h),)
    NCCL_INC := $(NCCL_SYSTEM_INC)
  else
    NCCL_PIP := $(shell python3 -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null)
    NCCL_INC := $(if $(and $(NCCL_PIP),$(wildcard $(NCCL_PIP)/include/nccl.h)),$(NCCL_PIP)/include)
  endif
  USE_NCCL ?= $(if $(NCCL_INC),1,0)
  ifeq ($(USE_NCCL),1)
    CFLAGS += -DUSE_NCCL
    ifneq ($(filter $(NCCL_HOME)/include $(NCCL_PIP)/include,$(NCCL_INC)),)
      # outside the toolkit and the system paths: its lib/ by file name (pip ships libnccl.so.2 without the
      # libnccl.so link), found again at run time through the rpath
      NCCL_LIB := $(abspath $(firstword $(wildcard $(NCCL_INC)/../lib/libnccl.so $(NCCL_INC)/../lib/libnccl.so.2)))
      $(if $(NCCL_LIB),,$(error no libnccl.so or libnccl.so.2 in $(NCCL_INC)/../lib))
      CFLAGS += -I$(NCCL_INC)
      LDLIBS += $(NCCL_LIB) -Wl,-rpath,$(abspath $(dir $(NCCL_LIB)))
    else
      NCCL_LIB := -lnccl
      LDLIBS += -lnccl
    endif
  endif
endif

LIB_SRCS := $(filter-out src/main.c,$(wildcard src/*.c src/data/*.c))
LIB_OBJS := $(patsubst src/%.c,$(BUILD)/src/%.o,$(LIB_SRCS)) $(CUDA_OBJS)
TEST_SRCS := $(wildcard tests/unit/test_*.c)
TEST_BINS := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(TEST_SRCS))
BENCH_SRCS := $(wildcard tests/bench/*.c)
BENCH_BINS := $(patsubst tests/bench/%.c,$(BUILD)/bench/%,$(BENCH_SRCS))

.PHONY: all deps run test bench clean vendor-debs build-info
all: simplest-dist
# What this build uses, for set-up scripts and bug reports.
build-info:
	@echo "CC=$(CC) USE_MPI=$(USE_MPI) USE_CUDA=$(USE_CUDA) NVCC=$(NVCC)"
	@echo "USE_NCCL=$(or $(USE_NCCL),0) NCCL_INC=$(NCCL_INC) NCCL_LIB=$(NCCL_LIB)"

# Rebuild when the flags change (USE_MPI=0 after USE_MPI=1, say).
$(BUILD)/flags: FORCE
	@mkdir -p $(BUILD)
	@echo '$(CC) $(CFLAGS) $(USE_CUDA)' | cmp -s - $@ || echo '$(CC) $(CFLAGS) $(USE_CUDA)' > $@
FORCE:
# The binary lives outside $(BUILD): relink it whenever another build dir or other flags made it.
.simplest-dist.flags: FORCE
	@echo '$(BUILD) $(CC) $(CFLAGS) $(LDLIBS)' | cmp -s - $@ || echo '$(BUILD) $(CC) $(CFLAGS) $(LDLIBS)' > $@

$(BUILD)/src/%.o: src/%.c $(wildcard src/*.h src/data/*.h) $(BUILD)/flags
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/kernels/%.o: kernels/%.cu $(wildcard kernels/*.cuh src/*.h) $(BUILD)/flags
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -DUSE_CUDA $(if $(wildcard kernels/flash2.cu),-DSD_HAVE_FLASH) -Isrc $(EXTRA_CFLAGS) -c $< -o $@

$(BUILD)/libsimplest.a: $(LIB_OBJS)
	ar rcs $@ $^

simplest-dist: $(BUILD)/src/main.o $(BUILD)/libsimplest.a .simplest-dist.flags
	$(CC) $(LDFLAGS) -o $@ $(BUILD)/src/main.o $(BUILD)/libsimplest.a $(LDLIBS)

$(BUILD)/tests/%: tests/unit/%.c $(wildcard tests/unit/*.h) $(BUILD)/libsimplest.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/unit -o $@ $< $(BUILD)/libsimplest.a $(LDFLAGS) $(LDLIBS)

$(BUILD)/bench/%: tests/bench/%.c $(BUILD)/libsimplest.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libsimplest.a $(LDFLAGS) $(LDLIBS)

# ---- fuzzing (tests/fuzz, docs/fuzzing.md)
# The readers of user files (config, weights, Shampoo state, datasets, images) must refuse bad bytes with one line
# or skip the image, never crash. `make fuzz-bins` builds each target with gcc + ASan/UBSan and a standalone main
# (in build-asan/, USE_MPI=0, no CUDA); `make test` runs every file of tests/fuzz/corpus/<target>/ through them.
# `make fuzz` is the coverage-guided search: clang + libFuzzer + ASan/UBSan in build-fuzz/, FUZZ_S seconds a target
# (FUZZ_TARGETS to pick), growing build-fuzz/corpus/<target>/ and writing any failing input to build-fuzz/.
FUZZ_NAMES := $(patsubst tests/fuzz/%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_TARGETS ?= $(FUZZ_NAMES)
FUZZ_S ?= 60
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
.PHONY: fuzz fuzz-bins fuzz-bins-here fuzz-libfuzzer-here fuzz-seeds
fuzz-bins:
	@$(MAKE) --no-print-directory BUILD=build-asan USE_MPI=0 USE_CUDA=0 OPT=-O1 \
	  EXTRA_CFLAGS="$(EXTRA_CFLAGS) $(SAN_FLAGS)" EXTRA_LDFLAGS="$(EXTRA_LDFLAGS) $(SAN_FLAGS)" fuzz-bins-here
fuzz-bins-here: $(patsubst %,$(BUILD)/fuzz/%,$(FUZZ_NAMES))
$(BUILD)/fuzz/%: tests/fuzz/%.c tests/fuzz/fuzz.h $(BUILD)/libsimplest.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DSD_FUZZ_STANDALONE -o $@ $< $(BUILD)/libsimplest.a $(LDFLAGS) $(LDLIBS)
# The seeds each target writes (valid files of every kind it reads), and the shipped configs for fuzz_config.
fuzz-seeds: fuzz-bins
	@for t in $(FUZZ_NAMES); do mkdir -p tests/fuzz/corpus/$$t && build-asan/fuzz/$$t --write-seeds tests/fuzz/corpus/$$t || exit 1; done
	@for c in configs/*.json configs/*/*/*.json; do n=$${c#configs/}; cp $$c tests/fuzz/corpus/fuzz_config/config_$$(echo $${n%.json} | tr / _); done
	@$${PYTHON:-/usr/bin/python3} tests/fuzz/make_jpeg_seeds.py tests/fuzz/corpus/fuzz_image
fuzz:
	@$(MAKE) --no-print-directory BUILD=build-fuzz CC=clang USE_MPI=0 USE_CUDA=0 OPT=-O1 \
	  EXTRA_CFLAGS="$(EXTRA_CFLAGS) -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer -Wno-pass-failed" \
	  EXTRA_LDFLAGS="$(EXTRA_LDFLAGS) -fsanitize=address,undefined" fuzz-libfuzzer-here
	@bad=0; for t in $(FUZZ_TARGETS); do mkdir -p build-fuzz/corpus/$$t; \
	  echo "fuzz: $$t for $(FUZZ_S) s"; \
	  build-fuzz/lf/$$t -max_total_time=$(FUZZ_S) -rss_limit_mb=4096 -malloc_limit_mb=2048 -timeout=30 \
	    -artifact_prefix=build-fuzz/$$t- -print_final_stats=1 -close_fd_mask=3 \
	    build-fuzz/corpus/$$t tests/fuzz/corpus/$$t > build-fuzz/$$t.log 2>&1; rc=$$?; \
	  grep -E '^(#[0-9]+[[:space:]]+DONE|==[0-9]+==|SUMMARY|Test unit written)' build-fuzz/$$t.log; \
	  arts=$$(ls build-fuzz | grep -E "^$$t-(crash|leak|oom|timeout)-"); \
	  if [ $$rc -ne 0 ] || [ -n "$$arts" ]; then echo "fuzz: $$t FAILED (exit $$rc; build-fuzz/$$t.log) $$arts"; bad=1; fi; \
	done; exit $$bad
fuzz-libfuzzer-here: $(patsubst %,$(BUILD)/lf/%,$(FUZZ_NAMES))
$(BUILD)/lf/%: tests/fuzz/%.c tests/fuzz/fuzz.h $(BUILD)/libsimplest.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fsanitize=fuzzer -o $@ $< $(BUILD)/libsimplest.a $(LDFLAGS) $(LDLIBS)

DEB_PKGS := procps libopenmpi-dev openmpi-bin libturbojpeg0-dev libjpeg-dev libcjson-dev libopenblas-dev liblapacke-dev zlib1g-dev dataset-fashion-mnist
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "deps: all packages present"; \
	elif [ "$$(id -u)" = 0 ]; then echo "deps: installing$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) || exit 1; \
	else echo "deps: missing$$missing; run: sudo apt-get install -y$$missing"; exit 1; fi

run: deps
	$(MAKE) simplest-dist
	./simplest-dist $(CONFIG)

test: simplest-dist $(TEST_BINS) $(BUILD)/gpu/test_cuda fuzz-bins
	@BUILD=$(BUILD) tests/run.sh

bench: simplest-dist $(BENCH_BINS)
	@BUILD=$(BUILD) tests/bench/run.sh

clean:
	rm -rf $(BUILD) simplest-dist .simplest-dist.flags

# ---- GPU checks and vendored packages
# tests/gpu/run.sh is the one-shot GPU check (docs/gpu-validation.md). `make gpu-bins` builds what it runs:
# the binary, build/gpu/test_cuda (CUDA against the CPU backend; in a build without CUDA it checks the CPU backend
# against itself) and the step benchmark.
GPU_BINS := $(BUILD)/gpu/test_cuda $(BUILD)/gpu/bench_ops
.PHONY: gpu-bins gpu-check
gpu-bins: simplest-dist $(GPU_BINS) $(BUILD)/bench/bench_step

$(BUILD)/gpu/%: tests/gpu/%.c $(BUILD)/libsimplest.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libsimplest.a $(LDFLAGS) $(LDLIBS)

gpu-check:
	tests/gpu/run.sh

# Air-gapped GPU nodes: `make vendor-debs` (on a connected Debian 12 machine, no root needed) downloads the .debs
# that a USE_MPI=0 build needs into vendor-debs/, and copies the Fashion-MNIST files for the GPU check beside them.
# tests/gpu/run.sh (or tests/gpu/unpack-debs.sh PREFIX) unpacks them with dpkg -x into a prefix, never into /, and
# builds with EXTRA_CFLAGS/EXTRA_LDFLAGS pointing there (-Wl,-rpath, so nothing else needs setting at run time).
# Runtime libraries that ldd showed the binary needs: libcjson.so.1, libopenblas.so.0 (+ libgfortran.so.5,
# libquadmath.so.0), liblapacke.so.3 (+ libtmglib.so.3; its liblapack.so.3 and libblas.so.3 come from the
# openblas-pthread folder, so liblapack3 and libblas3 are not needed), libz.so.1 (zlib1g: the dev package's libz.so
# points at it). The rest is the toolchain's (libc, libm, libgomp, libstdc++, libgcc_s) and CUDA's.
VENDOR_DEBS := libcjson1 libcjson-dev libopenblas0-pthread libopenblas-pthread-dev libopenblas-dev liblapacke \
               liblapacke-dev libtmglib3 libgfortran5 libquadmath0 zlib1g zlib1g-dev libjpeg62-turbo libjpeg62-turbo-dev \
               libturbojpeg0 libturbojpeg0-dev
FMNIST_SRC ?= /usr/share/datasets/fashion-mnist
vendor-debs:
	@mkdir -p vendor-debs/fashion-mnist
	rm -f vendor-debs/*.deb
	cd vendor-debs && apt-get download $(VENDOR_DEBS)
	@if ls $(FMNIST_SRC)/*-ubyte.gz >/dev/null 2>&1; then cp $(FMNIST_SRC)/*-ubyte.gz vendor-debs/fashion-mnist/; \
	else echo "vendor-debs: no Fashion-MNIST in $(FMNIST_SRC) (make deps installs dataset-fashion-mnist)"; fi
	@mkdir -p vendor-debs/bin && cp "$$(command -v make)" vendor-debs/bin/make  # for nodes without make (glibc only)
	@du -sh vendor-debs
