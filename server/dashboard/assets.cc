// assets.cc: the dashboard's URL paths and content types over the embedded
// files (dashboard_files.cc, generated into the build folder).
#include "server/dashboard/assets.h"

namespace zeroq::server {
namespace dashboard_files {
// The embedded file of that name (as in server/dashboard/); empty if none.
std::string_view File(std::string_view name);
}  // namespace dashboard_files

const Asset* FindAsset(std::string_view path) {
  static const Asset kAssets[] = {
      {"/", "text/html; charset=utf-8", dashboard_files::File("index.html")},
      {"/dashboard/app.js", "text/javascript; charset=utf-8",
       dashboard_files::File("app.js")},
      {"/dashboard/style.css", "text/css; charset=utf-8",
       dashboard_files::File("style.css")},
  };
  for (const Asset& asset : kAssets) {
    if (asset.path == path) return &asset;
  }
  return nullptr;
}

}  // namespace zeroq::server
