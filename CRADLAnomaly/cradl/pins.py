"""Versions of the optional packages the core and the Slicer module tell users to install, pinned as in
requirements.txt (a test keeps the two the same)."""

DEEPBET = "deepbet==1.0.2"  # brain extraction of heads with skull (cradl.brain)
NILEARN = "nilearn==0.14.1"  # ships the MNI152 template files (cradl.template)
