"""Services: reading Kubernetes Service YAML, storing and exporting this cluster's services,
and merging global services across clusters."""
