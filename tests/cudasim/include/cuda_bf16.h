// cudasim stand-in for the CUDA header: the bf16 type is in cudasim.h (already included)
#pragma once
