output "bucket_name" {
  description = "The data/artifact bucket (no gs:// prefix)."
  value       = google_storage_bucket.artifacts.name
}

output "pipeline_root" {
  description = "Pipeline root for Vertex AI Pipelines runs: pass as `vlmtune run --runner vertex --pipeline-root ...`. Objects under it expire after pipeline_root_retention_days."
  value       = "gs://${google_storage_bucket.artifacts.name}/pipeline_root"
}

output "image_registry_prefix" {
  description = "Registry prefix of the step images: `vlmtune images build|push --registry-prefix <this>` (VLMTUNE_IMAGE_PREFIX)."
  value       = "${google_artifact_registry_repository.images.location}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "template_registry_url" {
  description = "KFP host to upload compiled pipeline templates to (kfp.registry.RegistryClient(host=<this>))."
  value       = "https://${google_artifact_registry_repository.templates.location}-kfp.pkg.dev/${var.project_id}/${google_artifact_registry_repository.templates.repository_id}"
}

output "service_account_email" {
  description = "Service account Vertex AI Pipelines runs as: pass as `--service-account`."
  value       = google_service_account.pipeline.email
}

output "region" {
  description = "Region of the bucket, the repositories and the pipeline runs."
  value       = var.region
}
