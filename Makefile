# The C library for C and C++ users: builds it with cargo and installs it
# where pkg-config and CMake find it.
#
#   make                              cargo build --release -p afmesh-ffi
#   make install PREFIX=/opt/afmesh   header, libafmesh.so.$(VERSION) with its
#                                     .so.$(ABI) and .so links, libafmesh.a,
#                                     lib/pkgconfig/afmesh.pc,
#                                     lib/cmake/afmesh/afmeshConfig*.cmake
#   make uninstall PREFIX=/opt/afmesh removes exactly those
#   make check-install                ffi/install-test/run.sh: install into a
#                                     temp prefix, build the C example with
#                                     pkg-config and with CMake, run meshes
#
# DESTDIR stages an install (packaging); LIBDIR and INCLUDEDIR override
# the layout. `make install` builds only what is missing, so
# `make && sudo make install` does not run cargo as root.

PREFIX     ?= /usr/local
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
DESTDIR    ?=
CARGO      ?= cargo
INSTALL    ?= install
# The standard library inside libafmesh.a carries debug info; STRIP=: keeps it.
STRIP      ?= strip
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

# One source for each: the crate version and the SONAME's ABI number.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' ffi/Cargo.toml | head -n1)
ABI     := $(shell sed -n 's/.*let abi = "\([0-9]*\)".*/\1/p' ffi/build.rs | head -n1)
# What libafmesh.a needs besides itself: `rustc --print native-static-libs`
# for the Rust standard library on x86_64/aarch64 Linux (glibc).
PRIVATE_LIBS := -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc

LIB := $(TARGET_DIR)/release/libafmesh
DEST := $(DESTDIR)$(LIBDIR)
CMAKEDIR := $(LIBDIR)/cmake/afmesh

# afmesh.pc names directories under the prefix as ${prefix}/..., so
# `pkg-config --define-prefix` can relocate an unpacked tree.
PC_LIBDIR     := $(patsubst $(PREFIX)/%,$${prefix}/%,$(LIBDIR))
PC_INCLUDEDIR := $(patsubst $(PREFIX)/%,$${prefix}/%,$(INCLUDEDIR))

SUBST := -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@LIBDIR@|$(LIBDIR)|g' \
	-e 's|@INCLUDEDIR@|$(INCLUDEDIR)|g' -e 's|@VERSION@|$(VERSION)|g' \
	-e 's|@ABI@|$(ABI)|g' -e 's|@PRIVATE_LIBS@|$(PRIVATE_LIBS)|g' \
	-e 's|@PC_LIBDIR@|$(PC_LIBDIR)|g' -e 's|@PC_INCLUDEDIR@|$(PC_INCLUDEDIR)|g'

all: build

# cargo knows what is stale; make does not, so this always asks it.
build:
	$(CARGO) build --release -p afmesh-ffi
	ln -sf libafmesh.so $(LIB).so.$(ABI)

$(LIB).so $(LIB).a:
	$(MAKE) build

install: | $(LIB).so $(LIB).a
	@test -n "$(VERSION)" -a -n "$(ABI)" || { echo "Makefile: no version or ABI found in ffi/" >&2; exit 1; }
	$(INSTALL) -d $(DESTDIR)$(INCLUDEDIR) $(DEST)/pkgconfig $(DESTDIR)$(CMAKEDIR)
	$(INSTALL) -m 644 include/afmesh.h $(DESTDIR)$(INCLUDEDIR)/afmesh.h
	$(INSTALL) -m 755 $(LIB).so $(DEST)/libafmesh.so.$(VERSION)
	ln -sf libafmesh.so.$(VERSION) $(DEST)/libafmesh.so.$(ABI)
	ln -sf libafmesh.so.$(ABI) $(DEST)/libafmesh.so
	$(INSTALL) -m 644 $(LIB).a $(DEST)/libafmesh.a
	$(STRIP) --strip-debug $(DEST)/libafmesh.a
	sed $(SUBST) ffi/pkg/afmesh.pc.in > $(DEST)/pkgconfig/afmesh.pc
	sed $(SUBST) ffi/pkg/afmeshConfig.cmake.in > $(DESTDIR)$(CMAKEDIR)/afmeshConfig.cmake
	sed $(SUBST) ffi/pkg/afmeshConfigVersion.cmake.in > $(DESTDIR)$(CMAKEDIR)/afmeshConfigVersion.cmake

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/afmesh.h
	rm -f $(DEST)/libafmesh.so.$(VERSION) $(DEST)/libafmesh.so.$(ABI) $(DEST)/libafmesh.so
	rm -f $(DEST)/libafmesh.a $(DEST)/pkgconfig/afmesh.pc
	rm -f $(DESTDIR)$(CMAKEDIR)/afmeshConfig.cmake $(DESTDIR)$(CMAKEDIR)/afmeshConfigVersion.cmake
	-rmdir $(DESTDIR)$(CMAKEDIR) 2>/dev/null

check-install:
	ffi/install-test/run.sh

.PHONY: all build install uninstall check-install
