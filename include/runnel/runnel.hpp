// Everything runnel offers, in one include.
#pragma once

#include "channel.hpp"
#include "mpmc_queue.hpp"
#include "pipeline.hpp"
#include "select.hpp"
#include "spsc_queue.hpp"
#include "thread_pool.hpp"
#include "task_group.hpp"
