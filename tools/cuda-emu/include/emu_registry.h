// emu_registry.h - the table each generated kernel translation unit registers with the runtime:
// kernel name -> launch thunk, parameter types (which are pointers) and __launch_bounds__.
#pragma once

#include <cstddef>

namespace emu {

struct KernelParam {
    const char* name;  // parameter name in the kernel source
    const char* type;  // its C++ type after macro expansion, e.g. "const bf16*"
    std::size_t size;  // sizeof(type): the bytes cuLaunchKernel's args[i] points at
    std::size_t align; // alignof the pointee for pointers (a device pointer must honour it)
    bool is_pointer;   // checked against the device allocation table at every launch
};

struct KernelEntry {
    const char* name;                // extern "C" symbol, as cuModuleGetFunction asks for it
    const char* file;                // kernels/<file>.cu
    void (*thunk)(void** args);      // calls the kernel with args unpacked by its own types
    int nparams;
    const KernelParam* params;
    int max_threads;                 // __launch_bounds__ maximum (0 = none given)
};

// Called from static initialisers of the generated translation units.
__attribute__((visibility("default"))) bool register_kernels(const KernelEntry* entries, std::size_t n);

}  // namespace emu
