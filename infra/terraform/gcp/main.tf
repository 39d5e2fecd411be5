# Everything vlmtune needs in a GCP project: the APIs, one bucket (data, artifacts, pipeline root), an Artifact
# Registry repository for the step images and one for compiled pipeline templates, and a pipeline service account
# with the narrowest roles Vertex AI Pipelines runs need. See ../../README.md for the commands, in order.

locals {
  bucket_name = var.bucket_name != "" ? var.bucket_name : "${var.project_id}-${var.name_prefix}"
  apis = toset([
    "aiplatform.googleapis.com",
    "artifactregistry.googleapis.com",
    "compute.googleapis.com", # Vertex AI custom jobs (the pipeline steps) run on Compute Engine machines
    "iam.googleapis.com",
    "storage.googleapis.com",
  ])
}

resource "google_project_service" "enabled" {
  for_each = local.apis
  service  = each.value
  # Other workloads in the project may use the same APIs: destroying this stack must not switch them off.
  disable_on_destroy = false
}

# ------------------------------------------------------------------------------------------------ bucket

resource "google_storage_bucket" "artifacts" {
  name          = local.bucket_name
  location      = var.region
  force_destroy = var.force_destroy
  labels        = var.labels

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  # Versioning keeps an overwritten manifest or model recoverable; the rule below bounds what it costs.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_retention_days
    }
    action {
      type = "Delete"
    }
  }

  dynamic "lifecycle_rule" {
    for_each = var.pipeline_root_retention_days > 0 ? [1] : []
    content {
      condition {
        age            = var.pipeline_root_retention_days
        matches_prefix = ["pipeline_root/"]
      }
      action {
        type = "Delete"
      }
    }
  }

  dynamic "encryption" {
    for_each = var.kms_key_name != "" ? [1] : []
    content {
      default_kms_key_name = var.kms_key_name
    }
  }

  dynamic "logging" {
    for_each = var.access_log_bucket != "" ? [1] : []
    content {
      log_bucket        = var.access_log_bucket
      log_object_prefix = local.bucket_name
    }
  }

  depends_on = [google_project_service.enabled]
}

# ------------------------------------------------------------------------------------------------ registries

resource "google_artifact_registry_repository" "images" {
  location      = var.region
  repository_id = "${var.name_prefix}-images"
  description   = "vlmtune step images (vlmtune-cpu, vlmtune-cuda)"
  format        = "DOCKER"
  kms_key_name  = var.kms_key_name != "" ? var.kms_key_name : null
  labels        = var.labels

  docker_config {
    # A tag, once pushed, never moves: a pipeline run names exactly the image it ran (tags are versions, never latest).
    immutable_tags = true
  }

  depends_on = [google_project_service.enabled]
}

resource "google_artifact_registry_repository" "templates" {
  location      = var.region
  repository_id = "${var.name_prefix}-pipelines"
  description   = "Compiled vlmtune pipeline templates (KFP)"
  format        = "KFP"
  kms_key_name  = var.kms_key_name != "" ? var.kms_key_name : null
  labels        = var.labels

  depends_on = [google_project_service.enabled]
}

# ------------------------------------------------------------------------------------------------ identity

resource "google_service_account" "pipeline" {
  account_id   = "${var.name_prefix}-pipeline"
  display_name = "vlmtune pipeline runs"
  description  = "Identity of vlmtune's Vertex AI Pipelines runs: reads images, reads/writes its bucket, uses Vertex AI."

  depends_on = [google_project_service.enabled]
}

# Vertex AI has no resource-level role for running pipelines and custom jobs and uploading models: aiplatform.user
# on the project is the narrowest that works (aiplatform.admin would also let it change IAM-like settings).
resource "google_project_iam_member" "pipeline_vertex_user" {
  project = var.project_id
  role    = "roles/aiplatform.user"
  member  = google_service_account.pipeline.member
}

# Object admin on this bucket only: steps write artifacts and manifests, and replace them on retries.
resource "google_storage_bucket_iam_member" "pipeline_objects" {
  bucket = google_storage_bucket.artifacts.name
  role   = "roles/storage.objectAdmin"
  member = google_service_account.pipeline.member
}

# Read access on the two repositories only, not project-wide.
resource "google_artifact_registry_repository_iam_member" "pipeline_reads_images" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = google_service_account.pipeline.member
}

resource "google_artifact_registry_repository_iam_member" "pipeline_reads_templates" {
  location   = google_artifact_registry_repository.templates.location
  repository = google_artifact_registry_repository.templates.name
  role       = "roles/artifactregistry.reader"
  member     = google_service_account.pipeline.member
}

# Multi-node training (sft_config.nodes > 1): the sft/dpo step submits a Vertex AI CustomJob that runs as this same
# account. aiplatform.customJobs.create is already in roles/aiplatform.user above; submitting a job that runs as a
# service account also needs iam.serviceAccounts.actAs on that account: here, on itself only.
resource "google_service_account_iam_member" "pipeline_acts_as_itself" {
  service_account_id = google_service_account.pipeline.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.pipeline.member
}

# The hub token for gated models, read by the CustomJob's nodes from Secret Manager (launch.hub_token_secret_version):
# accessor on that one secret, when one is named. The secret itself (and its value) is made outside Terraform.
resource "google_secret_manager_secret_iam_member" "pipeline_reads_hub_token" {
  count     = var.hub_token_secret_id != "" ? 1 : 0
  project   = var.project_id
  secret_id = var.hub_token_secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.pipeline.member
}

# Who may start runs as the pipeline service account (actAs on this one account, not project-wide).
resource "google_service_account_iam_member" "submitters_act_as_pipeline" {
  for_each           = toset(var.pipeline_submitters)
  service_account_id = google_service_account.pipeline.name
  role               = "roles/iam.serviceAccountUser"
  member             = each.value
}

resource "google_artifact_registry_repository_iam_member" "pushers_images" {
  for_each   = toset(var.image_pushers)
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.writer"
  member     = each.value
}

resource "google_artifact_registry_repository_iam_member" "pushers_templates" {
  for_each   = toset(var.image_pushers)
  location   = google_artifact_registry_repository.templates.location
  repository = google_artifact_registry_repository.templates.name
  role       = "roles/artifactregistry.writer"
  member     = each.value
}
