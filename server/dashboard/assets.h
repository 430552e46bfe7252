// assets.h: the dashboard's files, compiled into the server.
//
// The HTTP server answers GET requests for these paths with the body and
// content type below; the files themselves are server/dashboard/index.html,
// app.js and style.css, embedded at build time (cmake/embed_files.cmake).
#ifndef ZEROQ_SERVER_DASHBOARD_ASSETS_H_
#define ZEROQ_SERVER_DASHBOARD_ASSETS_H_

#include <string_view>

namespace zeroq::server {

struct Asset {
  std::string_view path;          // "/", "/dashboard/app.js", ...
  std::string_view content_type;  // e.g. "text/html; charset=utf-8"
  std::string_view body;
};

// nullptr when there is no such file. "/" is index.html.
const Asset* FindAsset(std::string_view path);

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_DASHBOARD_ASSETS_H_
