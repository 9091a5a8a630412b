/* gst-diffuse — the core library's umbrella header. */
#pragma once

#include <diffuse/error.h>
#include <diffuse/tensor.h>
#include <diffuse/safetensors.h>
#include <diffuse/config.h>
#include <diffuse/hub.h>
#include <diffuse/pipeline.h>
#include <diffuse/rng.h>
#include <diffuse/scheduler.h>
#include <diffuse/clip_tokenizer.h>
#include <diffuse/clip_text.h>
#include <diffuse/safety_checker.h>
#include <diffuse/unet.h>
#include <diffuse/vae.h>
#include <diffuse/sd.h>
#include <diffuse/motion.h>
#include <diffuse/animate.h>
