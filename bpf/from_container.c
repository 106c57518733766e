/* tc ingress of an endpoint's host-side veth: packets leaving the pod (its egress policy). */
#include "lib/enforce.h"

int from_container(struct __sk_buff *skb)
{
    return enforce(skb, DIR_EGRESS);
}
