# GPAW build settings for machines without MPI or a C++-aware default compiler.
# GPAW's setup compiles its C++ sources with the C compiler unless told otherwise,
# which fails with "fatal error: algorithm" on Debian's gcc; g++ builds it.
# Used by scripts/bootstrap.sh as GPAW_CONFIG=scripts/gpaw-siteconfig.py.
compiler = 'g++'
mpi = False
