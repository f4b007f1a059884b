# medmoe — the commands a newcomer types. Everything real is in CMake.
#   make test    install missing Debian packages, build, run every test (ctest)
#   make bench   build and run the benchmarks (they print, never fail)
#   make demo    build and run the demo cluster
#   make asan    the test suite under AddressSanitizer + UBSan
BUILD ?= build
JOBS ?= $(shell nproc)
APT_PACKAGES = build-essential cmake pkg-config glslc libvulkan-dev mesa-vulkan-drivers \
  libopenblas-dev libcmocka-dev libjansson-dev libpng-dev libjpeg62-turbo-dev \
  libgrpc-dev libprotobuf-c-dev protobuf-c-compiler libzmq3-dev \
  libpcre2-dev python3-torch python3-numpy python3-pil python3-regex \
  python3-grpcio python3-grpc-tools python3-pydicom python3-zmq \
  openssl nodejs libmicrohttpd-dev python3-yaml iproute2 \
  clang libclang-rt-14-dev libomp-dev \
  libcurl4-openssl-dev orthanc orthanc-dicomweb dcmtk libdnnl-dev libgdcm-dev python3-gdcm

.PHONY: deps build test bench demo asan clean format

# Idempotent: ask dpkg which packages are missing, install only those.
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	else echo "all Debian packages present"; fi
	@# npm: Debian's package, unless a nodejs build that bundles npm is installed
	@command -v npm >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq npm; }

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && MEDMOE_REQUIRE_VULKAN=1 ctest --output-on-failure -j $(JOBS)

asan: deps
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DMEDMOE_SANITIZE=ON
	cmake --build build-asan -j $(JOBS)
	cd build-asan && MEDMOE_REQUIRE_VULKAN=1 ctest --output-on-failure -j $(JOBS)

bench: build
	cmake --build $(BUILD) --target bench

demo: build
	/usr/bin/python3 tools/demo.py $(BUILD)

format:
	find kernels model tests bench tools router-node expert-node -name '*.[ch]' 2>/dev/null | xargs clang-format -i

clean:
	rm -rf $(BUILD) build-asan
