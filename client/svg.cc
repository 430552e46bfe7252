#include "client/svg.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace zeroq::client {

namespace v1 = ::zeroq::v1;

namespace {

// Canvas and plot area, in SVG user units.
constexpr double kWidth = 760, kHeight = 500;
constexpr double kLeft = 90, kRight = 170, kTop = 50, kBottom = 70;
constexpr double kPlotW = kWidth - kLeft - kRight;
constexpr double kPlotH = kHeight - kTop - kBottom;

// A 1, 2 or 5 times a power of ten near range / target.
double NiceStep(double range, int target) {
  double raw = range / std::max(1, target);
  double power = std::pow(10.0, std::floor(std::log10(raw)));
  double f = raw / power;
  double nice = f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10;
  return nice * power;
}

std::string Num(double v) { return absl::StrFormat("%.2f", v); }

// Tick label: short, no trailing zeros.
std::string TickLabel(double v) {
  if (v == 0) return "0";
  return absl::StrFormat("%.4g", v);
}

class Axis {
 public:
  // Maps [lo, hi] onto [pixel_lo, pixel_hi] (pixel_hi < pixel_lo for y).
  Axis(double lo, double hi, bool log, double pixel_lo, double pixel_hi)
      : lo_(log ? std::log10(lo) : lo),
        hi_(log ? std::log10(hi) : hi),
        log_(log),
        pixel_lo_(pixel_lo),
        pixel_hi_(pixel_hi) {
    if (hi_ <= lo_) hi_ = lo_ + 1;
  }
  double operator()(double v) const {
    double t = log_ ? std::log10(v) : v;
    return pixel_lo_ + (t - lo_) / (hi_ - lo_) * (pixel_hi_ - pixel_lo_);
  }

 private:
  double lo_, hi_;
  bool log_;
  double pixel_lo_, pixel_hi_;
};

}  // namespace

std::vector<UniformPoint> UniformPoints(const v1::JobResult& result) {
  std::vector<UniformPoint> out;
  if (result.layers_size() == 0) return out;
  // Width -> (size, sensitivity, layers that have it).
  struct Sum {
    double size = 0, sensitivity = 0;
    int layers = 0;
  };
  std::map<int, Sum> sums;
  for (const v1::LayerResult& l : result.layers()) {
    const int n = std::min(l.candidate_bits_size(), l.sensitivity_size());
    for (int i = 0; i < n; ++i) {
      Sum& s = sums[l.candidate_bits(i)];
      s.size += static_cast<double>(l.params()) * l.candidate_bits(i);
      s.sensitivity += l.sensitivity(i);
      ++s.layers;
    }
  }
  for (const auto& [bits, s] : sums) {
    // A width some layer cannot take is no reachable uniform configuration.
    if (s.layers != result.layers_size()) continue;
    out.push_back({bits, s.size, s.sensitivity});
  }
  return out;
}

std::string XmlEscape(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        // Control characters are not allowed in XML 1.0.
        if (static_cast<unsigned char>(c) < 0x20 && c != '\n' && c != '\t') {
          out += ' ';
        } else {
          out += c;
        }
    }
  }
  return out;
}

std::string FrontierSvg(const v1::JobResult& result, absl::string_view title) {
  const std::vector<UniformPoint> uniform = UniformPoints(result);
  const bool has_chosen = result.chosen().size_bits() > 0;

  // Data ranges over everything drawn.
  std::vector<double> xs, ys;
  for (const v1::ParetoPoint& p : result.frontier()) {
    xs.push_back(p.size_bits() / 8.0 / 1024);
    ys.push_back(p.sensitivity());
  }
  for (const UniformPoint& u : uniform) {
    xs.push_back(u.size_bits / 8.0 / 1024);
    ys.push_back(u.sensitivity);
  }
  if (has_chosen) {
    xs.push_back(result.chosen().size_bits() / 8.0 / 1024);
    ys.push_back(result.chosen().sensitivity());
  }
  double x_min = 0, x_max = 1, y_min = 0, y_max = 1;
  double y_pos_min = std::numeric_limits<double>::infinity();
  if (!xs.empty()) {
    x_min = *std::min_element(xs.begin(), xs.end());
    x_max = *std::max_element(xs.begin(), xs.end());
    y_min = *std::min_element(ys.begin(), ys.end());
    y_max = *std::max_element(ys.begin(), ys.end());
    for (double y : ys) {
      if (y > 0) y_pos_min = std::min(y_pos_min, y);
    }
  }
  // Log scale when the positive values span two decades or more; values of
  // zero (or below) then sit on the bottom axis.
  const bool log_y = std::isfinite(y_pos_min) && y_max / y_pos_min >= 100;

  // X axis: nice ticks with a margin so points do not sit on the frame.
  double x_pad = std::max((x_max - x_min) * 0.05, 0.01 * std::max(1.0, x_max));
  double x_lo = std::max(0.0, x_min - x_pad), x_hi = x_max + x_pad;
  const double x_step = NiceStep(x_hi - x_lo, 6);
  x_lo = std::floor(x_lo / x_step) * x_step;
  x_hi = std::ceil(x_hi / x_step) * x_step;
  std::vector<double> x_ticks;
  for (double t = x_lo; t <= x_hi + x_step / 2; t += x_step) {
    x_ticks.push_back(t);
  }

  double y_lo, y_hi;
  std::vector<double> y_ticks;
  if (log_y) {
    y_lo = std::pow(10.0, std::floor(std::log10(y_pos_min)));
    y_hi = std::pow(10.0, std::ceil(std::log10(y_max)));
    if (y_hi <= y_lo) y_hi = y_lo * 10;
    const int decades = static_cast<int>(std::lround(std::log10(y_hi / y_lo)));
    const int every = std::max(1, (decades + 7) / 8);
    for (int d = 0; d <= decades; d += every) {
      y_ticks.push_back(y_lo * std::pow(10.0, d));
    }
  } else {
    double pad = std::max((y_max - y_min) * 0.05, 1e-12);
    y_lo = std::min(0.0, y_min - pad);
    y_hi = y_max + pad;
    const double step = NiceStep(y_hi - y_lo, 6);
    y_lo = std::floor(y_lo / step) * step;
    y_hi = std::ceil(y_hi / step) * step;
    for (double t = y_lo; t <= y_hi + step / 2; t += step) {
      y_ticks.push_back(std::abs(t) < step * 1e-9 ? 0 : t);
    }
  }
  const Axis x(x_lo, x_hi, false, kLeft, kLeft + kPlotW);
  const Axis y(y_lo, y_hi, log_y, kTop + kPlotH, kTop);
  auto py = [&](double v) { return log_y && v <= y_lo ? y(y_lo) : y(v); };

  std::string s;
  absl::StrAppend(
      &s, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
      absl::StrFormat(
          "<svg xmlns=\"http://www.w3.org/2000/svg\" "
          "width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
          "font-family=\"sans-serif\" font-size=\"12\">\n",
          kWidth, kHeight, kWidth, kHeight),
      "<title>", XmlEscape(title), "</title>\n",
      "<style>\n"
      "  .frontier { fill: #1f77b4; }\n"
      "  .frontier-line { fill: none; stroke: #1f77b4; stroke-width: 1.5; }\n"
      "  .chosen { fill: none; stroke: #d62728; stroke-width: 2.5; }\n"
      "  .uniform { fill: #ff7f0e; stroke: #000; stroke-width: 0.5; }\n"
      "  .grid { stroke: #ddd; stroke-width: 1; }\n"
      "  .axis { stroke: #000; stroke-width: 1; }\n"
      "</style>\n",
      absl::StrFormat("<rect x=\"0\" y=\"0\" width=\"%.0f\" height=\"%.0f\" "
                      "fill=\"#fff\"/>\n",
                      kWidth, kHeight),
      // Centred on the image, not the plot: a long title (job id, model
      // name, budget) must not run off the left edge.
      absl::StrFormat("<text x=\"%s\" y=\"28\" text-anchor=\"middle\" "
                      "font-size=\"14\" font-weight=\"bold\">%s</text>\n",
                      Num(kWidth / 2), XmlEscape(title)));

  // Grid, ticks and tick labels.
  s += "<g class=\"ticks\">\n";
  for (double t : x_ticks) {
    const double px = x(t);
    absl::StrAppendFormat(
        &s,
        "  <line class=\"grid\" x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n"
        "  <line class=\"axis\" x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n"
        "  <text x=\"%s\" y=\"%s\" text-anchor=\"middle\">%s</text>\n",
        Num(px), Num(kTop), Num(px), Num(kTop + kPlotH), Num(px),
        Num(kTop + kPlotH), Num(px), Num(kTop + kPlotH + 5), Num(px),
        Num(kTop + kPlotH + 19), XmlEscape(TickLabel(t)));
  }
  for (double t : y_ticks) {
    const double pyv = y(t);
    absl::StrAppendFormat(
        &s,
        "  <line class=\"grid\" x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n"
        "  <line class=\"axis\" x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\"/>\n"
        "  <text x=\"%s\" y=\"%s\" text-anchor=\"end\">%s</text>\n",
        Num(kLeft), Num(pyv), Num(kLeft + kPlotW), Num(pyv), Num(kLeft - 5),
        Num(pyv), Num(kLeft), Num(pyv), Num(kLeft - 8), Num(pyv + 4),
        XmlEscape(TickLabel(t)));
  }
  s += "</g>\n";
  // Frame and axis labels.
  absl::StrAppendFormat(
      &s,
      "<rect class=\"axis\" x=\"%s\" y=\"%s\" width=\"%s\" height=\"%s\" "
      "fill=\"none\"/>\n"
      "<text x=\"%s\" y=\"%s\" text-anchor=\"middle\">weight size "
      "(KiB)</text>\n"
      "<text x=\"%s\" y=\"%s\" text-anchor=\"middle\" transform=\"rotate(-90 "
      "%s %s)\">%s</text>\n",
      Num(kLeft), Num(kTop), Num(kPlotW), Num(kPlotH), Num(kLeft + kPlotW / 2),
      Num(kHeight - 22), Num(24), Num(kTop + kPlotH / 2), Num(24),
      Num(kTop + kPlotH / 2),
      log_y ? "total sensitivity (log scale)" : "total sensitivity");

  // The frontier: a line through the points in size order, then the points.
  std::vector<std::pair<double, double>> line;
  for (const v1::ParetoPoint& p : result.frontier()) {
    line.emplace_back(x(p.size_bits() / 8.0 / 1024), py(p.sensitivity()));
  }
  std::sort(line.begin(), line.end());
  if (line.size() > 1) {
    std::vector<std::string> pts;
    for (const auto& [px, pyv] : line) {
      pts.push_back(absl::StrCat(Num(px), ",", Num(pyv)));
    }
    absl::StrAppend(&s, "<polyline class=\"frontier-line\" points=\"",
                    absl::StrJoin(pts, " "), "\"/>\n");
  }
  s += "<g class=\"frontier-points\">\n";
  const double params = std::max<double>(1, result.quantizable_params());
  for (const v1::ParetoPoint& p : result.frontier()) {
    absl::StrAppendFormat(
        &s,
        "  <circle class=\"frontier\" cx=\"%s\" cy=\"%s\" r=\"3.5\">"
        "<title>%s</title></circle>\n",
        Num(x(p.size_bits() / 8.0 / 1024)), Num(py(p.sensitivity())),
        XmlEscape(absl::StrFormat(
            "%.2f KiB, %.3f bits average, sensitivity %.4g, bits %s",
            p.size_bits() / 8.0 / 1024, p.size_bits() / params, p.sensitivity(),
            absl::StrJoin(p.bits(), ","))));
  }
  s += "</g>\n";

  for (const UniformPoint& u : uniform) {
    const double px = x(u.size_bits / 8.0 / 1024), pyv = py(u.sensitivity);
    absl::StrAppendFormat(
        &s,
        "<circle class=\"uniform\" cx=\"%s\" cy=\"%s\" r=\"5\">"
        "<title>%s</title></circle>\n"
        "<text class=\"uniform-label\" x=\"%s\" y=\"%s\">W%d</text>\n",
        Num(px), Num(pyv),
        XmlEscape(absl::StrFormat("uniform %d bits: %.2f KiB, sensitivity %.4g",
                                  u.bits, u.size_bits / 8.0 / 1024,
                                  u.sensitivity)),
        Num(px + 7), Num(pyv - 7), u.bits);
  }

  if (has_chosen) {
    const v1::ParetoPoint& c = result.chosen();
    const double px = x(c.size_bits() / 8.0 / 1024), pyv = py(c.sensitivity());
    absl::StrAppendFormat(
        &s,
        "<circle class=\"chosen\" cx=\"%s\" cy=\"%s\" r=\"8\">"
        "<title>%s</title></circle>\n"
        "<text x=\"%s\" y=\"%s\" fill=\"#d62728\">chosen</text>\n",
        Num(px), Num(pyv),
        XmlEscape(absl::StrFormat("chosen: %.2f KiB, sensitivity %.4g",
                                  c.size_bits() / 8.0 / 1024, c.sensitivity())),
        Num(px + 10), Num(pyv + 16));
  }
  if (result.frontier_size() == 0) {
    absl::StrAppendFormat(
        &s, "<text x=\"%s\" y=\"%s\" text-anchor=\"middle\">%s</text>\n",
        Num(kLeft + kPlotW / 2), Num(kTop + kPlotH / 2),
        "no frontier: not a mixed-precision job");
  }

  // Legend, right of the plot.
  const double lx = kLeft + kPlotW + 20;
  absl::StrAppendFormat(
      &s,
      "<g class=\"legend\">\n"
      "  <circle class=\"legend-frontier\" cx=\"%s\" cy=\"%s\" r=\"3.5\" "
      "fill=\"#1f77b4\"/>\n"
      "  <text x=\"%s\" y=\"%s\">Pareto frontier (%d)</text>\n"
      "  <circle class=\"legend-chosen\" cx=\"%s\" cy=\"%s\" r=\"7\" "
      "fill=\"none\" stroke=\"#d62728\" stroke-width=\"2.5\"/>\n"
      "  <text x=\"%s\" y=\"%s\">chosen</text>\n"
      "  <circle class=\"legend-uniform\" cx=\"%s\" cy=\"%s\" r=\"5\" "
      "fill=\"#ff7f0e\"/>\n"
      "  <text x=\"%s\" y=\"%s\">uniform width</text>\n"
      "</g>\n",
      Num(lx), Num(kTop + 10), Num(lx + 14), Num(kTop + 14),
      result.frontier_size(), Num(lx), Num(kTop + 32), Num(lx + 14),
      Num(kTop + 36), Num(lx), Num(kTop + 54), Num(lx + 14), Num(kTop + 58));
  s += "</svg>\n";
  return s;
}

}  // namespace zeroq::client
