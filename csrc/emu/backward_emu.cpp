// The CUDA backward (host launcher + device code) compiled by the host compiler against the CUDA
// emulator (csrc/emu/emu.h): registered as topk_distill_emu::* for CPU tensors.
#define TD_EMULATE 1
#include "../cuda/backward.cu"
