// std::chrono's clocks, durations and time points, without the rest of
// <chrono>. In C++20 mode libstdc++'s <chrono> also brings the calendar,
// time-zone and parsing parts, which include <sstream> and the locale
// machinery: about 0.5 s of every compile that includes runnel (g++ 12),
// for nothing runnel uses. libstdc++ keeps the part we need in
// <bits/chrono.h> (what its own <thread> and <mutex> include); elsewhere
// this is plain <chrono>.
#pragma once

#include <version>  // small; defines __GLIBCXX__ when the library is libstdc++

#if defined(__GLIBCXX__) && __has_include(<bits/chrono.h>)
#include <bits/chrono.h>
#else
#include <chrono>
#endif
