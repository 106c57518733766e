"""Local endpoints: address management, pod network plumbing (veth, netns), the CNI plugin,
and the manager that creates, restores and deletes them."""
