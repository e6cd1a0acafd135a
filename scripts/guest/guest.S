/*
 * qmig test guest: a 512-byte boot sector that dirties guest RAM forever.
 *
 * Written for the qmig project (MIT OR Apache-2.0). Build with build.sh:
 *   gcc -m32 -c guest.S -D...  &&  ld -m elf_i386 -Ttext 0x7c00 --oformat binary
 *
 * Behaviour: the BIOS loads this sector at 0x7c00 in real mode. It enables A20,
 * switches to flat 32-bit protected mode (no paging, interrupts off) and then loops:
 *
 *   pass = pass + 1
 *   for every 4 KiB page P in [DIRTY_START, DIRTY_START + DIRTY_SIZE):
 *       for k in 0 .. WRITES_PER_PAGE-1:
 *           dword at P + k*STRIDE  =  (P + k*STRIDE) XOR pass
 *   write one character ('a' + pass % 26) to COM1 (port 0x3f8)
 *   busy-wait DELAY_TSC time-stamp-counter ticks
 *
 * so each pass changes a few bytes at WRITES_PER_PAGE offsets in every page of the
 * range (small XBZRLE deltas), every written location is unique across pages, and RAM
 * outside the range is left alone (zero pages). With MAX_PASSES != 0 the guest stops
 * after that many passes and halts with interrupts off (memory then stays constant).
 *
 * Parameters (preprocessor defines, all optional):
 *   DIRTY_START      physical start address, page aligned      (default 0x100000)
 *   DIRTY_SIZE       bytes, multiple of 4096                    (default 0x100000)
 *   WRITES_PER_PAGE  dword writes per page, 1..1024, power of 2 (default 2)
 *   DELAY_TSC        TSC ticks to wait after each pass          (default 0x100000)
 *   MAX_PASSES       0 = loop forever                           (default 0)
 *   NO_INVLPG        define to skip the per-page INVLPG
 *
 * INVLPG: before writing a page the guest invalidates its TLB entry (legal without
 * paging). Under TCG this forces QEMU's softmmu TLB to be refilled, so the first write
 * after each migration dirty-bitmap sync is tracked again even on QEMU versions (seen
 * with 7.2) that do not re-arm dirty tracking in the TLB after a sync; without it a
 * 7.2 source loses guest writes and converges early.
 */

#ifndef DIRTY_START
#define DIRTY_START 0x100000
#endif
#ifndef DIRTY_SIZE
#define DIRTY_SIZE 0x100000
#endif
#ifndef WRITES_PER_PAGE
#define WRITES_PER_PAGE 2
#endif
#ifndef DELAY_TSC
#define DELAY_TSC 0x100000
#endif
#ifndef MAX_PASSES
#define MAX_PASSES 0
#endif

#define PAGE 4096
#define STRIDE (PAGE / WRITES_PER_PAGE)
#define DIRTY_END (DIRTY_START + DIRTY_SIZE)
#define COM1 0x3f8
#define SEL_CODE 0x08
#define SEL_DATA 0x10

        .text
        .code16
        .globl _start
_start:
        cli
        cld
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7c00, %sp

        /* Fast A20 gate (system control port A): set bit 1, never bit 0 (reset). */
        inb     $0x92, %al
        orb     $0x02, %al
        andb    $0xfe, %al
        outb    %al, $0x92

        lgdtl   gdt_ptr
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmp    $SEL_CODE, $protected

        .code32
protected:
        movw    $SEL_DATA, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %fs
        movw    %ax, %gs
        movw    %ax, %ss
        movl    $0x7c00, %esp

        xorl    %ebx, %ebx              /* ebx = pass counter */

next_pass:
        incl    %ebx
        movl    $DIRTY_START, %edi      /* edi = current page */
page_loop:
#ifndef NO_INVLPG
        invlpg  (%edi)
#endif
        xorl    %ecx, %ecx              /* ecx = offset within the page */
word_loop:
        leal    (%edi,%ecx), %eax
        xorl    %ebx, %eax
        movl    %eax, (%edi,%ecx)
        addl    $STRIDE, %ecx
        cmpl    $PAGE, %ecx
        jb      word_loop
        addl    $PAGE, %edi
        cmpl    $DIRTY_END, %edi
        jb      page_loop

        /* One character per pass on COM1: 'a' + pass % 26. */
        movl    %ebx, %eax
        xorl    %edx, %edx
        movl    $26, %ecx
        divl    %ecx
        movb    %dl, %al
        addb    $'a', %al
        movw    $COM1, %dx
        outb    %al, %dx

#if MAX_PASSES
        cmpl    $MAX_PASSES, %ebx
        jae     halt
#endif

        /* Busy-wait DELAY_TSC ticks (TCG's TSC follows the host clock). */
        rdtsc
        movl    %eax, %esi
        movl    %edx, %ebp
delay:
        pause
        rdtsc
        subl    %esi, %eax
        sbbl    %ebp, %edx
        jnz     next_pass               /* waited >= 2^32 ticks */
        cmpl    $DELAY_TSC, %eax
        jb      delay
        jmp     next_pass

halt:
        hlt
        jmp     halt

        .p2align 3
gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08: code, base 0, limit 4 GiB, 32-bit */
        .quad   0x00cf92000000ffff      /* 0x10: data, base 0, limit 4 GiB */
gdt_ptr:
        .word   gdt_ptr - gdt - 1
        .long   gdt

        .org    510
        .byte   0x55, 0xaa
