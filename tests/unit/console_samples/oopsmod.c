#include <linux/module.h>
#include <linux/init.h>
#include <linux/delay.h>
#include <linux/preempt.h>
#include <linux/rcupdate.h>
MODULE_LICENSE("GPL");
static int mode = 0;
static struct rcu_head head;
static void cb(struct rcu_head *h) { }
module_param(mode, int, 0);
static int __init oopsmod_init(void)
{
	volatile int *p = NULL;
	if (mode == 1) { WARN(1, "qemukit test warning"); return -EINVAL; }
	if (mode == 2) { BUG(); }
	if (mode == 3) { volatile unsigned long *q = (unsigned long *)0xdead000000000100UL; return *q; }
	if (mode == 4) { preempt_disable(); mdelay(45000); preempt_enable(); return -EINVAL; }
	if (mode == 5) { call_rcu(&head, cb); preempt_disable(); mdelay(45000); preempt_enable(); rcu_barrier(); return -EINVAL; }
	*p = 1;  /* NULL pointer write: an oops, the kernel kills insmod and runs on */
	return 0;
}
module_init(oopsmod_init);
