/* gst-diffuse — the core library's umbrella header. */
#pragma once

#include <diffuse/error.h>
#include <diffuse/tensor.h>
#include <diffuse/safetensors.h>
#include <diffuse/config.h>
