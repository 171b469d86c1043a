// The SVG chart of a runnel::scaling report: speed-up against cores, one
// series per implementation, the ideal line, labelled axes and a legend, so
// that the picture reads without the table. Hand-written (a few dozen
// elements; no packaged C++ plotting library is worth a dependency here).
//
// Speed-up is over the single-thread loop when the report has one (--peers),
// so that every series is measured against the same floor; otherwise over
// each implementation's own 1-core run. Each series is a <g class="series"
// data-implementation="NAME">, which tests and scripts can find.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include "report.hpp"

namespace runnel::scaling {

namespace detail {

inline std::string xml_escape(const std::string& s) {
  std::string r;
  for (char c : s) {
    switch (c) {
      case '&': r += "&amp;"; break;
      case '<': r += "&lt;"; break;
      case '>': r += "&gt;"; break;
      case '"': r += "&quot;"; break;
      case '\'': r += "&apos;"; break;
      default: r += c;
    }
  }
  return r;
}

// A round step (1, 2 or 5 times a power of ten) giving about `n` ticks.
inline double nice_step(double range, int n) {
  const double raw = range / n;
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0})
    if (raw <= m * p) return m * p;
  return 10 * p;
}

}  // namespace detail

inline void write_svg(const report& rep, std::ostream& out) {
  using detail::fmt;
  const bool vs_loop = rep.has_loop();
  // Series in first-appearance order, each a list of (cores, speed-up).
  std::vector<std::string> names;
  std::map<std::string, std::vector<std::pair<double, double>>> series;
  double max_x = 1, max_y = 1;
  for (const auto& r : rep.rows) {
    const double y = vs_loop ? r.vs_loop : r.speedup;
    if (!series.count(r.implementation)) names.push_back(r.implementation);
    auto& s = series[r.implementation];
    max_x = std::max(max_x, static_cast<double>(r.cores));
    if (std::isfinite(y)) {
      s.emplace_back(static_cast<double>(r.cores), y);
      max_y = std::max(max_y, y);
    }
  }
  const double cpus = static_cast<double>(std::max<std::size_t>(rep.cpus, 1));
  max_y = std::max(max_y, std::min(max_x, cpus));
  const double y_step = detail::nice_step(max_y * 1.1, 6);
  const double y_top = std::ceil(max_y * 1.1 / y_step) * y_step;
  const double x_step = max_x <= 16 ? 1 : detail::nice_step(max_x, 8);
  const double x_right = std::ceil(max_x / x_step) * x_step;

  constexpr double width = 760, height = 480, left = 70, right = 210, top = 56, bottom = 64;
  const double pw = width - left - right, ph = height - top - bottom;
  auto px = [&](double x) { return left + x / x_right * pw; };
  auto py = [&](double y) { return top + ph - y / y_top * ph; };
  static const char* const colours[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"};

  out << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" viewBox=\"0 0 " << width << ' ' << height << "\" font-family=\"sans-serif\" font-size=\"13\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << width / 2 << "\" y=\"24\" text-anchor=\"middle\" font-size=\"16\">"
      << detail::xml_escape(rep.title) << "</text>\n"
      << "<text x=\"" << width / 2 << "\" y=\"42\" text-anchor=\"middle\" fill=\"#555\">"
      << detail::xml_escape((rep.opts.ordered ? std::string("ordered") : std::string("unordered")) + ", " +
                            std::to_string(rep.cpus) + " allowed CPUs, median of " +
                            std::to_string(rep.opts.repetitions) + " runs")
      << "</text>\n";
  // Grid, ticks and tick labels.
  out << "<g class=\"grid\" stroke=\"#ddd\">\n";
  for (double y = 0; y <= y_top + 1e-9; y += y_step)
    out << "<line x1=\"" << left << "\" y1=\"" << fmt("%.1f", py(y)) << "\" x2=\"" << left + pw << "\" y2=\""
        << fmt("%.1f", py(y)) << "\"/>\n";
  for (double x = 0; x <= x_right + 1e-9; x += x_step)
    out << "<line x1=\"" << fmt("%.1f", px(x)) << "\" y1=\"" << top << "\" x2=\"" << fmt("%.1f", px(x))
        << "\" y2=\"" << top + ph << "\"/>\n";
  out << "</g>\n<g class=\"ticks\" fill=\"#333\">\n";
  for (double y = 0; y <= y_top + 1e-9; y += y_step)
    out << "<text x=\"" << left - 8 << "\" y=\"" << fmt("%.1f", py(y) + 4) << "\" text-anchor=\"end\">"
        << fmt("%g", y) << "</text>\n";
  for (double x = 0; x <= x_right + 1e-9; x += x_step)
    out << "<text x=\"" << fmt("%.1f", px(x)) << "\" y=\"" << top + ph + 18 << "\" text-anchor=\"middle\">"
        << fmt("%g", x) << "</text>\n";
  out << "</g>\n";
  // Axes and their labels.
  out << "<g class=\"axes\" stroke=\"#333\"><line x1=\"" << left << "\" y1=\"" << top + ph << "\" x2=\""
      << left + pw << "\" y2=\"" << top + ph << "\"/><line x1=\"" << left << "\" y1=\"" << top << "\" x2=\"" << left
      << "\" y2=\"" << top + ph << "\"/></g>\n"
      << "<text class=\"x-label\" x=\"" << left + pw / 2 << "\" y=\"" << height - 18
      << "\" text-anchor=\"middle\">cores (worker threads)</text>\n"
      << "<text class=\"y-label\" transform=\"translate(20 " << top + ph / 2
      << ") rotate(-90)\" text-anchor=\"middle\">"
      << (vs_loop ? "speed-up over the single-thread loop" : "speed-up over the same implementation on 1 core")
      << "</text>\n";
  // Ideal: linear up to the allowed CPUs, flat beyond (oversubscribed).
  out << "<g class=\"ideal\" data-implementation=\"ideal\"><polyline fill=\"none\" stroke=\"#999\" "
         "stroke-dasharray=\"6 4\" stroke-width=\"1.5\" points=\""
      << fmt("%.1f", px(0)) << ',' << fmt("%.1f", py(0)) << ' ' << fmt("%.1f", px(std::min(cpus, x_right))) << ','
      << fmt("%.1f", py(std::min(cpus, x_right)));
  if (x_right > cpus) out << ' ' << fmt("%.1f", px(x_right)) << ',' << fmt("%.1f", py(cpus));
  out << "\"/></g>\n";
  // One series per implementation.
  for (std::size_t i = 0; i < names.size(); ++i) {
    const char* c = colours[i % (sizeof colours / sizeof colours[0])];
    const auto& pts = series[names[i]];
    out << "<g class=\"series\" data-implementation=\"" << detail::xml_escape(names[i]) << "\" stroke=\"" << c
        << "\" fill=\"" << c << "\">\n";
    if (pts.size() > 1) {
      out << "<polyline fill=\"none\" stroke-width=\"2\" points=\"";
      for (const auto& [x, y] : pts) out << fmt("%.1f", px(x)) << ',' << fmt("%.1f", py(y)) << ' ';
      out << "\"/>\n";
    }
    for (const auto& [x, y] : pts)
      out << "<circle cx=\"" << fmt("%.1f", px(x)) << "\" cy=\"" << fmt("%.1f", py(y)) << "\" r=\"4\"><title>"
          << detail::xml_escape(names[i]) << ", " << fmt("%g", x) << " cores: " << fmt("%.2f", y)
          << "</title></circle>\n";
    out << "</g>\n";
  }
  // Legend.
  const double lx = left + pw + 20;
  double ly = top + 10;
  out << "<g class=\"legend\">\n";
  out << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 24 << "\" y2=\"" << ly
      << "\" stroke=\"#999\" stroke-dasharray=\"6 4\" stroke-width=\"1.5\"/><text x=\"" << lx + 32 << "\" y=\""
      << ly + 4 << "\">ideal</text>\n";
  for (std::size_t i = 0; i < names.size(); ++i) {
    ly += 22;
    const char* c = colours[i % (sizeof colours / sizeof colours[0])];
    std::string label = names[i] == loop_name ? std::string("loop (1 thread)") : names[i];
    out << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 24 << "\" y2=\"" << ly << "\" stroke=\""
        << c << "\" stroke-width=\"2\"/><circle cx=\"" << lx + 12 << "\" cy=\"" << ly << "\" r=\"4\" fill=\"" << c
        << "\"/><text x=\"" << lx + 32 << "\" y=\"" << ly + 4 << "\">" << detail::xml_escape(label) << "</text>\n";
  }
  out << "</g>\n</svg>\n";
}

}  // namespace runnel::scaling
