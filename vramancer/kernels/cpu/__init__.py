"""Our AVX2 CPU kernels: their build, their C++ sources and the modules that call them."""
