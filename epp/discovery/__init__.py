"""Where endpoints come from: a static list or file (standalone), or Kubernetes."""
