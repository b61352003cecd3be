// Emulated CUDA header for host builds of csrc/cuda/*.cu (test-only): see ../cuda_emulation.h.
#pragma once
#include "../cuda_emulation.h"
