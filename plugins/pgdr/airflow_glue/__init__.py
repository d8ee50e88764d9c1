"""Where pgdr meets Airflow: connections, failure and deadline callbacks, notifiers, pools, assets
and the alert journal. The domain packages call into Airflow only through here or inside functions."""
