// The project's CUDA sources, compiled for the CPU emulation (see cuda.h): the same files NVRTC
// compiles, with the same prelude, and the registry the Rust side launches them through; and
// selftest.cu, kernels that check the emulation itself.

#include "cuda.h"

#include "../cuda/prelude.cuh"

#include "../cuda/attention.cu"
#include "../cuda/lora.cu"
#include "../cuda/ops.cu"

#include "selftest.cu"

thread_local const emu::Thread* emu::current = nullptr;

std::vector<emu::Entry>& emu::registry() {
    static std::vector<Entry> entries;
    return entries;
}

extern "C" {

void switchyard_emu_enter(const emu::Thread* thread) { emu::current = thread; }

int32_t switchyard_emu_entry_count(void) { return (int32_t)emu::registry().size(); }

const char* switchyard_emu_entry_name(int32_t index) { return emu::registry()[(std::size_t)index].name; }

int32_t switchyard_emu_param_count(int32_t index) {
    return (int32_t)emu::registry()[(std::size_t)index].param_sizes.size();
}

uint32_t switchyard_emu_param_size(int32_t index, int32_t param) {
    return emu::registry()[(std::size_t)index].param_sizes[(std::size_t)param];
}

void switchyard_emu_invoke(int32_t index, void* const* params) { emu::registry()[(std::size_t)index].invoke(params); }
}
