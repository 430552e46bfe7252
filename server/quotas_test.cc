// Tests of TenantQuotas on a real SqliteJobStore and FileBlobStore in a
// scratch folder: the upload and submit checks with their messages, the
// stored-bytes gauge and the removal of unused blobs.
#include "server/quotas.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/blob_store.h"
#include "server/job_store.h"
#include "server/metrics.h"
#include "server/sha256.h"
#include "server/tenants.h"

namespace zeroq::server {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// acme: every quota; zeta: in the registry without quotas.
std::string TenantsFile() {
  return absl::StrCat(R"({"tenants": [
    {"name": "acme", "api_key_sha256": [")",
                      Sha256Hex("key-a"), R"("],
     "quotas": {"running_jobs": 2, "queued_jobs": 5, "stored_bytes": 100,
                "model_bytes": 60}},
    {"name": "zeta", "api_key_sha256": [")",
                      Sha256Hex("key-z"), R"("]}
  ]})");
}

// The value of one series ("name{labels}") in the text format; NaN when the
// series is absent.
double Value(const std::string& text, absl::string_view series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, series) || !absl::ConsumePrefix(&line, " "))
      continue;
    double value;
    if (absl::SimpleAtod(line, &value)) return value;
  }
  return std::nan("");
}

class QuotasTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern =
        (fs::path(testing::TempDir()) / "zeroq-quotas-test-XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    absl::StatusOr<TenantRegistry> tenants = TenantRegistry::Parse(TenantsFile());
    ASSERT_TRUE(tenants.ok()) << tenants.status();
    tenants_ = std::make_unique<TenantRegistry>(*std::move(tenants));
    auto store = SqliteJobStore::Open((dir_ / "zeroq.db").string());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
    auto blobs = FileBlobStore::Create((dir_ / "blobs").string());
    ASSERT_TRUE(blobs.ok()) << blobs.status();
    blobs_ = *std::move(blobs);
    auto metrics = Metrics::Create("");
    ASSERT_TRUE(metrics.ok()) << metrics.status();
    metrics_ = *std::move(metrics);
    quotas_ = std::make_unique<TenantQuotas>(tenants_.get(), store_.get(),
                                             blobs_.get(), metrics_.get());
  }

  void TearDown() override {
    quotas_.reset();
    store_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  BlobInfo PutBlob(const std::string& bytes) {
    auto writer = blobs_->NewWriter();
    EXPECT_TRUE(writer.ok()) << writer.status();
    EXPECT_TRUE((*writer)->Append(bytes).ok());
    absl::StatusOr<BlobInfo> info = (*writer)->Commit();
    EXPECT_TRUE(info.ok()) << info.status();
    return *info;
  }

  // A READY model of `size` bytes, stored with its blob.
  v1::Model AddModel(const std::string& tenant, const std::string& id,
                     int size, char fill = 'm') {
    BlobInfo blob = PutBlob(std::string(size, fill));
    v1::Model model;
    model.set_id(id);
    model.set_tenant(tenant);
    model.set_sha256(blob.sha256);
    model.set_size_bytes(blob.size_bytes);
    model.set_state(v1::MODEL_READY);
    EXPECT_TRUE(store_->PutModel(model).ok());
    return model;
  }

  // A SUCCEEDED job whose one artifact is `size` bytes.
  v1::Job AddSucceededJob(const std::string& tenant, const std::string& id,
                          const std::string& model_id, int size) {
    BlobInfo blob = PutBlob(std::string(size, 'a'));
    v1::Job job;
    job.set_id(id);
    job.set_tenant(tenant);
    job.set_model_id(model_id);
    job.set_state(v1::JOB_QUEUED);
    JobStore* store = store_.get();
    absl::StatusOr<CreateJobResult> created = store->CreateJob(job);
    EXPECT_TRUE(created.ok()) << created.status();
    job.set_state(v1::JOB_SUCCEEDED);
    v1::Artifact* a = job.mutable_result()->add_artifacts();
    a->set_name("model.zeroq.pt");
    a->set_sha256(blob.sha256);
    a->set_size_bytes(blob.size_bytes);
    EXPECT_TRUE(store->UpdateJob(job, {}).ok());
    return job;
  }

  static v1::ModelMetadata Metadata(int64_t size, const std::string& sha256) {
    v1::ModelMetadata m;
    m.set_name("resnet");
    m.set_size_bytes(size);
    m.set_sha256(sha256);
    return m;
  }

  fs::path dir_;
  std::unique_ptr<TenantRegistry> tenants_;
  std::unique_ptr<JobStore> store_;
  std::unique_ptr<BlobStore> blobs_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<TenantQuotas> quotas_;
};

TEST_F(QuotasTest, LimitsComeFromTheTenantsQuotas) {
  ASSERT_NE(quotas_->Of("acme"), nullptr);
  EXPECT_EQ(quotas_->Of("acme")->stored_bytes, 100);
  EXPECT_EQ(quotas_->RunningLimit("acme"), 2);
  EXPECT_EQ(quotas_->QueuedLimit("acme"), 5);
  EXPECT_EQ(quotas_->RunningLimit("zeta"), 0);
  EXPECT_EQ(quotas_->QueuedLimit("zeta"), 0);
  EXPECT_EQ(quotas_->Of("nobody"), nullptr);
  EXPECT_EQ(quotas_->RunningLimit("nobody"), 0);

  // No registry: no quotas at all.
  TenantQuotas open(nullptr, store_.get(), blobs_.get(), nullptr);
  EXPECT_EQ(open.Of("acme"), nullptr);
  EXPECT_EQ(open.QueuedLimit("acme"), 0);
  EXPECT_TRUE(open.CheckUpload("acme", Metadata(1 << 20, "ff")).ok());
  EXPECT_TRUE(open.CheckSubmit("acme").ok());
}

TEST_F(QuotasTest, UploadOverModelBytesIsRefused) {
  absl::Status s = quotas_->CheckUpload("acme", Metadata(61, Sha256Hex("x")));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(),
            "quota model_bytes: the model is 61 bytes, tenant acme's limit is "
            "60 bytes per model");
  EXPECT_TRUE(quotas_->CheckUpload("acme", Metadata(60, Sha256Hex("x"))).ok());
  // A tenant without quotas uploads anything.
  EXPECT_TRUE(
      quotas_->CheckUpload("zeta", Metadata(1 << 30, Sha256Hex("x"))).ok());
}

TEST_F(QuotasTest, UploadOverStoredBytesNamesTheLargestHoldings) {
  v1::Model m1 = AddModel("acme", "m-1", 50);
  AddSucceededJob("acme", "j-2", "m-1", 30);
  AddModel("zeta", "m-9", 40, 'z');  // another tenant's: not counted
  // 80 held; 21 more would pass 100.
  absl::Status s = quotas_->CheckUpload("acme", Metadata(21, Sha256Hex("y")));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(),
            "quota stored_bytes: tenant acme holds 80 bytes; 21 more would "
            "pass its limit of 100 bytes. Delete jobs or models you no longer "
            "need; the largest: model m-1 (50 bytes), job j-2 (30 bytes)");
  EXPECT_EQ(Value(metrics_->Scrape(), "zeroq_stored_bytes{tenant=\"acme\"}"),
            80);
  EXPECT_TRUE(quotas_->CheckUpload("acme", Metadata(20, Sha256Hex("y"))).ok());
  // Bytes acme holds already store nothing new: a deduplicated upload passes
  // even though its size alone would go over.
  EXPECT_TRUE(quotas_->CheckUpload("acme", Metadata(50, m1.sha256())).ok());
}

TEST_F(QuotasTest, SubmitAtOrOverStoredBytesIsRefused) {
  AddModel("acme", "m-1", 60);
  EXPECT_TRUE(quotas_->CheckSubmit("acme").ok());  // 60 < 100
  AddSucceededJob("acme", "j-2", "m-1", 40);       // exactly at the limit
  absl::Status s = quotas_->CheckSubmit("acme");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(),
            "quota stored_bytes: tenant acme holds 100 bytes, its limit is "
            "100, and a job's results would add more. Delete jobs or models "
            "you no longer need; the largest: model m-1 (60 bytes), job j-2 "
            "(40 bytes)");
  AddSucceededJob("acme", "j-3", "m-1", 5);  // over it
  EXPECT_THAT(quotas_->CheckSubmit("acme").message(),
              HasSubstr("holds 105 bytes"));
  EXPECT_TRUE(quotas_->CheckSubmit("zeta").ok());
}

TEST_F(QuotasTest, QueuedLimitErrorNamesTheCountAndTheLimit) {
  absl::Status s = quotas_->QueuedLimitError("acme", 5);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(),
            "quota queued_jobs: tenant acme already has 5 queued jobs, the "
            "limit is 5; wait for some to start or cancel them");
}

TEST_F(QuotasTest, LargestHoldingsIsEmptyForATenantHoldingNothing) {
  EXPECT_EQ(quotas_->LargestHoldings("acme"), "");
  AddModel("acme", "m-1", 10);
  EXPECT_EQ(quotas_->LargestHoldings("acme"),
            "; the largest: model m-1 (10 bytes)");
}

TEST_F(QuotasTest, RefreshSetsTheStoredBytesGauge) {
  AddModel("acme", "m-1", 10);
  AddModel("zeta", "m-2", 7, 'z');
  ASSERT_TRUE(quotas_->RefreshAll().ok());
  const std::string text = metrics_->Scrape();
  EXPECT_EQ(Value(text, "zeroq_stored_bytes{tenant=\"acme\"}"), 10);
  EXPECT_EQ(Value(text, "zeroq_stored_bytes{tenant=\"zeta\"}"), 7);
  AddModel("acme", "m-3", 5, 'q');
  EXPECT_EQ(quotas_->RefreshStoredBytes("acme"), 15);
  EXPECT_EQ(Value(metrics_->Scrape(), "zeroq_stored_bytes{tenant=\"acme\"}"),
            15);
}

TEST_F(QuotasTest, RemoveBlobIfUnusedKeepsReferencedBlobs) {
  v1::Model model = AddModel("acme", "m-1", 10);
  // zeta's model of the same bytes keeps them after acme's is gone.
  v1::Model other = model;
  other.set_id("m-2");
  other.set_tenant("zeta");
  ASSERT_TRUE(store_->PutModel(other).ok());
  ASSERT_TRUE(store_->DeleteModel("m-1").ok());
  ASSERT_TRUE(quotas_->RemoveBlobIfUnused(model.sha256()).ok());
  EXPECT_TRUE(blobs_->Exists(model.sha256()));
  EXPECT_EQ(Value(metrics_->Scrape(), "zeroq_blobs_removed_total"), 0);

  ASSERT_TRUE(store_->DeleteModel("m-2").ok());
  ASSERT_TRUE(quotas_->RemoveBlobIfUnused(model.sha256()).ok());
  EXPECT_FALSE(blobs_->Exists(model.sha256()));
  EXPECT_EQ(Value(metrics_->Scrape(), "zeroq_blobs_removed_total"), 1);

  // Gone already, or no blob at all: nothing to do.
  EXPECT_TRUE(quotas_->RemoveBlobIfUnused(model.sha256()).ok());
  EXPECT_TRUE(quotas_->RemoveBlobIfUnused("").ok());
  EXPECT_EQ(Value(metrics_->Scrape(), "zeroq_blobs_removed_total"), 1);
}

TEST_F(QuotasTest, RemoveBlobIfUnusedKeepsArtifacts) {
  AddModel("acme", "m-1", 10);
  v1::Job job = AddSucceededJob("acme", "j-1", "m-1", 20);
  const std::string sha = job.result().artifacts(0).sha256();
  ASSERT_TRUE(quotas_->RemoveBlobIfUnused(sha).ok());
  EXPECT_TRUE(blobs_->Exists(sha));
  ASSERT_TRUE(store_->DeleteJob("j-1").ok());
  ASSERT_TRUE(quotas_->RemoveBlobIfUnused(sha).ok());
  EXPECT_FALSE(blobs_->Exists(sha));
}

}  // namespace
}  // namespace zeroq::server
