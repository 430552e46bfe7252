// pg_util.h: what end-to-end tests need of the PostgreSQL server that
// ZEROQ_TEST_PG_URI names (ctest's fixture "postgres").
#ifndef ZEROQ_TESTS_PG_UTIL_H_
#define ZEROQ_TESTS_PG_UTIL_H_

#include <libpq-fe.h>

#include <string>

#include "absl/strings/str_cat.h"

namespace zeroq::testing {

// Runs one statement on the PostgreSQL server `uri` names; "" or the error.
inline std::string PgExec(const std::string& uri, const std::string& sql) {
  PGconn* conn = PQconnectdb(uri.c_str());
  std::string error;
  if (PQstatus(conn) != CONNECTION_OK) {
    error = PQerrorMessage(conn);
  } else {
    PGresult* result = PQexec(conn, sql.c_str());
    if (PQresultStatus(result) != PGRES_COMMAND_OK) {
      error = PQresultErrorMessage(result);
    }
    PQclear(result);
  }
  PQfinish(conn);
  return error;
}

// The URI `base` (postgresql:///DB?host=...) naming database `db` instead;
// "" when `base` has no query part.
inline std::string WithDatabase(const std::string& base, const std::string& db) {
  const size_t query = base.find('?');
  if (query == std::string::npos) return "";
  const size_t path = base.rfind('/', query);
  return absl::StrCat(base.substr(0, path + 1), db, base.substr(query));
}

}  // namespace zeroq::testing

#endif  // ZEROQ_TESTS_PG_UTIL_H_
