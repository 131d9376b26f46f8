// Package deploy holds no code that ships: its tests check the deployment files beside
// them (Dockerfile, compose.yaml, k8s/) against each other and against the environment
// variables the services read. The probe command in probe/ is the health check the image
// carries for compose.
package deploy
