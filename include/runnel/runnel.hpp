// Everything runnel offers, in one include.
#pragma once

#include "mpmc_queue.hpp"
#include "spsc_queue.hpp"
