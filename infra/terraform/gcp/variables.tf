variable "project_id" {
  description = "GCP project that holds everything (e.g. my-ml-project). Needs billing enabled."
  type        = string
}

variable "region" {
  description = "Region for the bucket, the Artifact Registry repositories and Vertex AI Pipelines runs (e.g. us-central1). Pick one with the GPUs you train on (L4: us-central1, europe-west4, ...)."
  type        = string
  default     = "us-central1"
}

variable "name_prefix" {
  description = "Prefix of every resource name (bucket, repositories, service account), so two installs can share a project."
  type        = string
  default     = "vlmtune"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,20}$", var.name_prefix))
    error_message = "name_prefix must be 3-21 characters: lower-case letters, digits and '-', starting with a letter."
  }
}

variable "bucket_name" {
  description = "Name of the GCS bucket for data, artifacts and the pipeline root. Globally unique; empty means \"<project_id>-<name_prefix>\"."
  type        = string
  default     = ""
}

variable "pipeline_root_retention_days" {
  description = "Objects under pipeline_root/ (intermediate step outputs and caches of Vertex AI Pipelines runs) are deleted this many days after creation. Registered models live outside that prefix and are kept. 0 keeps them forever."
  type        = number
  default     = 30
}

variable "noncurrent_version_retention_days" {
  description = "Overwritten or deleted object versions (the bucket is versioned) are kept this many days, then deleted."
  type        = number
  default     = 14
}

variable "kms_key_name" {
  description = "Optional Cloud KMS key (projects/P/locations/L/keyRings/R/cryptoKeys/K) to encrypt the bucket and the repositories with (CMEK). Empty: Google-managed keys. The storage and Artifact Registry service agents need roles/cloudkms.cryptoKeyEncrypterDecrypter on it."
  type        = string
  default     = ""
}

variable "access_log_bucket" {
  description = "Optional existing bucket that receives the data bucket's usage logs. Empty: no usage logs (Cloud Audit Logs still record admin activity)."
  type        = string
  default     = ""
}

variable "pipeline_submitters" {
  description = "Members allowed to run pipelines as the pipeline service account (roles/iam.serviceAccountUser on it only), e.g. [\"user:me@example.com\", \"group:ml@example.com\"]. They also need roles/aiplatform.user on the project, which is not granted here."
  type        = list(string)
  default     = []
}

variable "hub_token_secret_id" {
  description = "Optional Secret Manager secret id (in project_id) holding the hub token for gated models; the pipeline service account gets roles/secretmanager.secretAccessor on it only. Empty: no grant (public models need no token)."
  type        = string
  default     = ""
}

variable "image_pushers" {
  description = "Members allowed to push step images and pipeline templates (roles/artifactregistry.writer on the two repositories only), e.g. a CI service account \"serviceAccount:ci@P.iam.gserviceaccount.com\"."
  type        = list(string)
  default     = []
}

variable "labels" {
  description = "Labels put on the bucket and the repositories."
  type        = map(string)
  default     = { app = "vlmtune" }
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete the bucket even when it still holds objects. Keep false outside throw-away projects."
  type        = bool
  default     = false
}
