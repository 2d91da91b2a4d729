// cudasim stand-in for the CUDA header: the bf16 type is in cudasim.h
#pragma once
#include "cudasim.h"
