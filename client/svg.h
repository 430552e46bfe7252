// svg.h: the Pareto frontier of a mixed-precision job as a standalone SVG
// plot (no plotting library): weight size against total sensitivity.
//
//   std::string svg = FrontierSvg(job.result(), "job j-1: fashion_cnn MP4");
//
// Contract of the document, relied on by scripts and tests:
//   - one <circle class="frontier"> per result.frontier point, in order;
//   - one <circle class="chosen"> around the chosen point (if it is set);
//   - one <circle class="uniform"> per uniform width every layer can take,
//     labelled "W2", "W4", ... (see UniformPoints);
//   - x is the weight size in KiB; y is the total sensitivity, on a log scale
//     when the plotted values span two decades or more (the axis label says
//     so);
//   - all text is XML-escaped, so the output is well-formed XML.
#ifndef ZEROQ_CLIENT_SVG_H_
#define ZEROQ_CLIENT_SVG_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::client {

struct UniformPoint {
  int bits = 0;
  double size_bits = 0;    // sum over layers of params * bits
  double sensitivity = 0;  // sum over layers of their omega at `bits`
};

// The uniform-width configurations, from each layer's candidate widths and
// sensitivities: one point per width that every layer has a sensitivity for,
// in increasing width. Empty when the result has no sensitivities.
std::vector<UniformPoint> UniformPoints(const zeroq::v1::JobResult& result);

// Escapes & < > " ' for XML text and attribute values.
std::string XmlEscape(absl::string_view text);

// The plot, as a complete SVG document.
std::string FrontierSvg(const zeroq::v1::JobResult& result,
                        absl::string_view title);

}  // namespace zeroq::client

#endif  // ZEROQ_CLIENT_SVG_H_
